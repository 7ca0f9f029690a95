"""Where one decode step's time goes: the embedded SmolLM2 GGUF at its serving defaults, N running sequences
(contexts of 128-512 tokens), as a markdown table.

Per N: the step's wall clock (`LLMEngine.step()`: scheduling, inputs, forward, sampling, outputs) and, in the
same loop, interleaved with it, the time of the step's matmuls alone (every linear layer and the LM head on N
random rows); then a few steps under torch.profiler, with ranges put around the model's parts by this script
(the engine carries no profiling code): int4 matmuls, LM head, attention (KV write, gather, SDPA), norms,
rotary, activation, sampler. What the ranges do not cover is the rest of the forward (residual adds, the
embedding, views) and the host (scheduler, step inputs, Python). The profiler adds ~1 us per op, so its
step is longer than the wall clock's; the shares are what it shows.

    python -m bench.step_profile                 # 1, 8 and 32 sequences, this CPU's instruction set
    python -m bench.step_profile --isa avx2      # torch's (and oneDNN's, MKL's) AVX2 kernels, float32

`--isa avx2` re-runs the script with ATEN_CPU_CAPABILITY=avx2 (torch's kernel dispatch), ONEDNN_MAX_CPU_ISA
and MKL_ENABLE_INSTRUCTIONS capped at AVX2, Pagoda's C++ operators built for x86-64-v3 (as the image builds
them), and dtype float32: what `dtype=auto` picks on a CPU without native bfloat16, so an AVX-512 host
reports an AVX2 host's step too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
# the profile's rows, in order: (range name, label)
PARTS = [
    ("int4_matmul", "int4 matmuls (qkv, o, gate_up, down)"),
    ("lm_head", "LM head"),
    ("cpp_attention", "attention: C++ kernel (KV write + attention in place; decodes: + rotary)"),
    ("kv_write", "attention: KV write"),
    ("attn_plan", "attention: plan (masks, gather indices)"),
    ("gather", "attention: gather blocks"),
    ("sdpa", "attention: SDPA"),
    ("attn_rest", "attention: rest (views, output copy)"),
    ("norm", "RMSNorm"),
    ("rotary", "rotary"),
    ("activation", "activation (SiLU * up)"),
    ("forward_rest", "rest of the forward (residual adds, embedding, views)"),
    ("sampler", "sampler"),
    ("host", "scheduler, step inputs, outputs, Python"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 8, 32], help="running sequences")
    parser.add_argument("--isa", choices=sorted(ISA_ENV), help="cap torch's kernels at this instruction set")
    parser.add_argument("--dtype", help="engine dtype (default: auto; float32 with --isa avx2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps (and matmul chains) per N")
    parser.add_argument("--profiled-steps", type=int, default=3, help="steps under the profiler per N")
    parser.add_argument(
        "--engine-option", action="append", default=[], metavar="KEY=VALUE",
        help="an extra EngineConfig option (an A/B of a flag), e.g. enforce_eager=true",
    )  # fmt: skip
    return parser.parse_args()


def reexec_under_isa(isa: str, module: str = "bench.step_profile") -> None:
    """Start `module` over with the ISA caps in the environment: torch reads them when it loads."""
    env = ISA_ENV[isa]
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    argv = [sys.executable, "-m", module, *sys.argv[1:]]
    os.execve(sys.executable, argv, {**os.environ, **env})


def use_avx2_extension() -> None:
    """Pagoda's C++ operators as the image builds them (-march=x86-64-v3: AVX2, no AVX-512), so that
    `--isa avx2` runs an AVX2 host's code of ours too, not only of torch's."""
    import tempfile
    from pathlib import Path

    from pagoda import cpu_extension

    native = cpu_extension.library_path()
    avx2 = cpu_extension.build("x86-64-v3", Path(tempfile.gettempdir()) / f"x86-64-v3{native.name}")
    cpu_extension.library_path = lambda: avx2  # type: ignore[assignment]


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    dtype = args.dtype or ("float32" if args.isa else None)
    if dtype:
        options["dtype"] = dtype
    for item in args.engine_option:
        key, _, value = item.partition("=")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def main() -> None:
    args = parse_args()
    if args.isa:
        reexec_under_isa(args.isa)
    import torch

    from bench.env import cpu_model
    from pagoda import LLM

    if args.isa == "avx2":
        use_avx2_extension()
    llm = LLM(**engine_options(args))
    engine = llm.engine
    runner = engine.runner
    print(
        f"CPU: {cpu_model()}; torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; dtype {runner.dtype}, quantization {runner.quantization}"
    )
    results = [profile_batch(engine, n, args.repeats, args.profiled_steps) for n in args.seqs]
    print()
    print(markdown(results))


def profile_batch(engine: Any, num_seqs: int, repeats: int, profiled_steps: int) -> dict[str, Any]:
    """Decode steps of `num_seqs` sequences whose contexts spread over 128..448 tokens (+ the steps run)."""
    from pagoda import SamplingParams

    vocab = engine.vocab_size
    lengths = [128 + 320 * i // max(1, num_seqs - 1) for i in range(num_seqs)] if num_seqs > 1 else [256]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    ids = [f"n{num_seqs}-{i}" for i in range(num_seqs)]
    for i, (request_id, length) in enumerate(zip(ids, lengths, strict=True)):
        engine.add_request(request_id, [(7 + 31 * (i + 1) * t) % vocab for t in range(length)], params)
    seqs = [s for request_id in ids for s in engine.requests[request_id].seqs]
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):  # prefill
        engine.step()
    for _ in range(3):
        engine.step()
    matmuls = matmul_chain(engine.runner, num_seqs)
    matmuls()
    step_times, matmul_times = [], []
    for _ in range(repeats):  # interleaved: both see the same machine load
        step_times.append(timed(engine.step))
        matmul_times.append(timed(matmuls))
    step_cpu = statistics.median(cpu for _, cpu in step_times)
    step_times = [wall for wall, _ in step_times]
    matmul_times = [wall for wall, _ in matmul_times]
    parts, ops, profiled = profiled_breakdown(engine, profiled_steps)
    contexts = [s.num_tokens for s in seqs]
    for request_id in ids:
        engine.abort_request(request_id)
    step, matmul = statistics.median(step_times), statistics.median(matmul_times)
    return {
        "seqs": num_seqs, "context": (min(contexts), max(contexts)), "step": step, "matmul": matmul,
        "step_cpu": step_cpu,
        "parts": parts, "ops": ops, "profiled_step": profiled,
    }  # fmt: skip


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall clock and this process's CPU time of one call: on a shared machine (with OMP_NUM_THREADS=1)
    the CPU time is the steadier of the two."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def matmul_chain(runner: Any, rows: int) -> Callable[[], None]:
    """Every linear layer of the model, then the LM head, on `rows` random rows: the step's matmuls alone."""
    import torch

    model = runner.model
    linears = [m for m in model.modules() if hasattr(m, "quant_method")]
    hidden = model.spec.hidden_size
    inputs = {m: torch.randn(rows, _input_size(m), dtype=runner.dtype) for m in linears}
    head_input = torch.randn(rows, hidden, dtype=runner.dtype)

    @torch.inference_mode()
    def chain() -> None:
        for m in linears:
            m(inputs[m])
        model.lm_head(head_input)

    return chain


def _input_size(linear: Any) -> int:
    return getattr(linear, "input_size", None) or linear.weight.shape[1]


def profiled_breakdown(engine: Any, steps: int) -> tuple[dict[str, float], float, float]:
    """Seconds per step of each part, top-level eager ops per step, and the profiled step's wall clock."""
    from torch.profiler import ProfilerActivity, profile

    with ranges(engine.runner), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
    totals: dict[str, float] = defaultdict(float)
    ops = 0
    for event in prof.events():
        if event.name.startswith("aten::"):
            ops += not _under_aten_op(event)
        else:
            totals[event.name] += event.cpu_time_total * 1e-6 / steps
    parts = {name: totals[name] for name, _ in PARTS}
    attention = ("kv_write", "attn_plan", "gather", "sdpa", "cpp_attention")
    parts["attn_rest"] = totals["attention"] - sum(parts[k] for k in attention)
    in_forward = ("int4_matmul", "norm", "rotary", "activation", "attention")
    # the forward's own ops, and the logits' beyond the head's matmul (the float cast)
    parts["forward_rest"] = (
        totals["forward"] - sum(totals[k] for k in in_forward) + totals["logits"] - totals["lm_head"]
    )
    parts["host"] = wall - totals["forward"] - totals["logits"] - totals["sampler"]
    return parts, ops / steps, wall


def _under_aten_op(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


@contextmanager
def ranges(runner: Any) -> Iterator[None]:
    """Profiler ranges around the model's parts, for the duration of the block: instance attributes and
    module globals wrapped here, restored after."""
    from pagoda.attention import cpu_kernels, torch_backend
    from pagoda.layers.activation import GatedActivation
    from pagoda.layers.attention import Attention
    from pagoda.layers.norm import RMSNorm
    from pagoda.layers.rotary import RotaryEmbedding

    model = runner.model
    kinds = [
        (Attention, "attention"), (RMSNorm, "norm"), (RotaryEmbedding, "rotary"),
        (GatedActivation, "activation"),
    ]  # fmt: skip
    patches: list[tuple[Any, str, Any]] = [(model, "forward", "forward"), (model, "compute_logits", "logits")]
    patches.append((model.lm_head, "forward", "lm_head"))
    patches.append((runner.sampler, "sample", "sampler"))
    for module in model.modules():
        if hasattr(module, "quant_method"):
            patches.append((module, "forward", "int4_matmul"))
        patches += [(module, "forward", name) for kind, name in kinds if isinstance(module, kind)]
        if isinstance(module, RMSNorm) and hasattr(module, "add_norm_"):  # the residual added in place
            patches.append((module, "add_norm_", "norm"))
        if isinstance(module, RotaryEmbedding) and hasattr(module, "rotate_"):  # q/k rotated in place
            patches.append((module, "rotate_", "rotary"))
    fused = [m for m in model.modules() if isinstance(m, Attention) and hasattr(m, "rope_attention")]
    functions = [
        (torch_backend, "write_kv", "kv_write"), (torch_backend, "_plan", "attn_plan"),
        (torch_backend, "_gather", "gather"), (torch_backend, "_attend", "sdpa"),
        (cpu_kernels, "paged_decode_attention", "cpp_attention"),
    ]  # fmt: skip
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in functions]
    for module, attr, name in functions:
        setattr(module, attr, _in_range(getattr(module, attr), name))
    for obj, attr, name in patches:
        setattr(obj, attr, _in_range(getattr(obj, attr), name))  # an instance attribute shadows the method
    for module in fused:  # the rotation, KV write and kernel of a decode step in one C++ call
        wrapped = _in_range(_in_range(module.rope_attention, "cpp_attention"), "attention")
        module.rope_attention = wrapped  # type: ignore[method-assign]
        patches.append((module, "rope_attention", "attention"))
    try:
        yield
    finally:
        for obj, attr, _ in patches:
            delattr(obj, attr)
        for module, attr, original in saved:
            setattr(module, attr, original)


def _in_range(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    from torch.profiler import record_function

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapped


def markdown(results: list[dict[str, Any]]) -> str:
    header = "| | " + " | ".join(f"{r['seqs']} seq" for r in results) + " |"
    rule = "| --- |" + " ---: |" * len(results)
    lines = [header, rule]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("contexts (tokens)", [f"{r['context'][0]}-{r['context'][1]}" for r in results])
    row("**step, wall clock (ms)**", [f"**{r['step'] * 1e3:.2f}**" for r in results])
    row("step, CPU time of the process (ms)", [f"{r['step_cpu'] * 1e3:.2f}" for r in results])
    row("matmuls alone, same loop (ms)", [f"{r['matmul'] * 1e3:.2f}" for r in results])
    row("**step / matmuls**", [f"**{r['step'] / r['matmul']:.2f}x**" for r in results])
    row("decode tok/s", [f"{r['seqs'] / r['step']:.0f}" for r in results])
    row("eager ops per step", [f"{r['ops']:.0f}" for r in results])
    row("*profiled step (ms): share*", [f"*{r['profiled_step'] * 1e3:.2f}*" for r in results])
    for name, label in PARTS:
        row(label, [f"{r['parts'][name] * 1e3:.2f} ({r['parts'][name] / r['profiled_step']:.0%})"
                    for r in results])  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
