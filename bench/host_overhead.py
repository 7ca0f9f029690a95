"""The host's share of a decode step: how long the engine's Python takes per step at 1, 32 and 256 running
sequences, split into its phases, on a model whose forward costs next to nothing.

A batch of `--batch` requests (random prompts of 64-128 tokens, ignore_eos, greedy, detokenized and with
outputs only when finished, as `LLM.generate` asks; `--stream`: an output every step, as the server's)
is added to an engine with room for all of them; once their prefills are done, N decode steps are timed,
each split by wrapping the engine's own methods from here (the engine carries no profiling code; times
are exclusive: a phase's nested phases are not counted twice):

    schedule     Scheduler.schedule (and the block manager under it)
    inputs       build_step_inputs (flat ids, positions, slots, block tables)
    forward      ModelRunner.run: attention metadata, host-to-device copies, the forward, the LM head
    sample       Sampler.sample (on CUDA it waits for the forward: .tolist() synchronises), or with
                 asynchronous scheduling Sampler.pick, which leaves the tokens on the device
    execute      the rest of ModelRunner.execute: the sampled tokens as lists (with asynchronous
                 scheduling, the wait for them and launching the next step's guess), and freeing the step's
                 tensors (on the CPU, at 256 rows, mostly unmapping the 50 MB of logits: 4-5 ms)
    tokens       Request.append_token: stop checks, incremental detokenization, stop strings
    outputs      Request.output: the RequestOutput snapshots (and a FINAL_ONLY request's detokenization,
                 done when it ends: without `--stream` the timed steps, where nothing ends, leave it out;
                 it costs what detokenizing token by token costs in `tokens` with `--stream`)
    other        the rest of LLMEngine.step

On `--device cuda` the script also times the device: the last decode step's forward, LM head and argmax
run back to back (`--device-repeats` times, CUDA events around them; with CUDA graphs the step's graph is
replayed on its inputs); wall / device says how CPU-bound the engine is.

    python -m bench.host_overhead                           # CPU, a tiny random Llama, 1 / 32 / 256
    python -m bench.host_overhead --device cuda --shape qwen0.5b
    python -m bench.host_overhead --device cuda --model /path/to/Qwen2.5-0.5B --batch 256

The tiny model (hidden 64, 2 layers) and `--shape qwen0.5b` (Qwen2.5-0.5B's shape, random bfloat16, like
bench.gpu_offline's) come with the embedded SmolLM2's tokenizer (49,152 tokens): a real byte-level BPE to
detokenize with; ids past its vocabulary (2/3 of qwen0.5b's) decode to nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PHASES = ["schedule", "inputs", "forward", "sample", "execute", "tokens", "outputs", "other"]
# the engine's Python around the model: the same on any device (`execute` is left out: on the CPU it is
# mostly the allocator's, on a GPU a tenth of a millisecond)
HOST_PHASES = ["schedule", "inputs", "tokens", "outputs", "other"]
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=49152,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256], help="running sequences")
    parser.add_argument("--model", help="a model directory (default: a random model of --shape)")
    parser.add_argument("--shape", choices=["tiny", "qwen0.5b"], default="tiny")
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per batch size")
    parser.add_argument("--warmup-steps", type=int, default=5, help="decode steps before timing")
    parser.add_argument("--max-tokens", type=int, default=300, help="output tokens per request")
    parser.add_argument(
        "--clock", choices=["thread", "wall"],
        help="the phases' clock: this thread's CPU time (default on cpu: robust to other processes on a busy "
        "machine) or the wall clock (default on cuda, where the host waits for the device)",
    )  # fmt: skip
    parser.add_argument(
        "--stream", action="store_true",
        help="a cumulative output every step, as the server streams (default: the final one only, as "
        "LLM.generate asks)",
    )  # fmt: skip
    parser.add_argument("--device-repeats", type=int, default=20, help="back-to-back forwards (cuda)")
    parser.add_argument(
        "--tokenizer", type=Path,
        help="a tokenizer directory for the random model (default: the embedded SmolLM2's; where that "
        "package is not installed, as on a GPU machine, one saved from it)",
    )  # fmt: skip
    parser.add_argument(
        "--engine-option", action="append", default=[], metavar="KEY=VALUE",
        help="an extra EngineConfig option, e.g. enforce_eager=true or skip_tokenizer_init=true",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.clock = args.clock or ("thread" if args.device == "cpu" else "wall")
    return args


def make_model(shape: str, path: Path, tokenizer: Path | None = None) -> Path:
    """A random model of `shape` with SmolLM2's tokenizer (or `tokenizer`'s), saved to `path`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from pagoda.embedded import embedded_model_path
    from pagoda.loader import open_checkpoint

    torch.manual_seed(0)
    if shape == "tiny":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    else:
        from bench.gpu_offline import QWEN2_05B

        config = Qwen2Config(**QWEN2_05B, torch_dtype="bfloat16")
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    if tokenizer is not None:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)
    else:
        open_checkpoint(str(embedded_model_path())).tokenizer.save_pretrained(path)
    return path


class PhaseTimer:
    """Exclusive wall time per phase: time spent in a wrapped call, minus its wrapped callees'."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[float] = []  # per open call: the time its wrapped callees took
        self.enabled = False  # the wrappers cost ~1 us a call: the wall clock is timed without them

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return original(*args, **kwargs)
            self.stack.append(0.0)
            start = self.clock()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = self.clock() - start
                nested = self.stack.pop()
                self.totals[phase] += elapsed - nested
                if self.stack:
                    self.stack[-1] += elapsed

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.totals.clear()


def instrument(llm: Any, clock: Callable[[], float]) -> PhaseTimer:
    from pagoda.engine import model_runner
    from pagoda.engine.request import Request

    engine = llm.engine
    timer = PhaseTimer(clock)
    timer.wrap(engine, "step", "other")
    timer.wrap(model_runner, "build_step_inputs", "inputs")
    timer.wrap(engine.runner, "execute", "execute")
    timer.wrap(engine.runner, "run", "forward")
    timer.wrap(engine.runner.sampler, "sample", "sample")
    timer.wrap(engine.runner.sampler, "pick", "sample")
    timer.wrap(Request, "append_token", "tokens")
    timer.wrap(Request, "output", "outputs")
    return timer


def instrument_scheduler(engine: Any, timer: PhaseTimer) -> None:
    """The engine builds a new scheduler when it resets (after its warm-up): wrap the current one."""
    timer.wrap(engine.scheduler, "schedule", "schedule")


def add_requests(engine: Any, batch: int, args: argparse.Namespace, tag: str) -> None:
    from pagoda import sampling_params

    rng = random.Random(batch)
    params = sampling_params.SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    kind = getattr(sampling_params, "RequestOutputKind", None)  # absent before outputs had kinds
    if kind is not None and not args.stream:  # as LLM.generate asks
        params = dataclasses.replace(params, output_kind=kind.FINAL_ONLY)
    tokenizer = engine.tokenizer
    vocab = min(engine.vocab_size, len(tokenizer)) if tokenizer is not None else engine.vocab_size
    for i in range(batch):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(64, 128))]
        engine.add_request(f"{tag}-{i}", prompt, params)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(llm: Any, timer: PhaseTimer, batch: int, args: argparse.Namespace) -> dict[str, float]:
    engine = llm.engine
    add_requests(engine, batch, args, f"b{batch}")
    # prefills (chunked under the token budget) until every sequence decodes, then a few decode steps
    while engine.scheduler.waiting or any(s.num_completion_tokens == 0 for s in engine.scheduler.running):
        engine.step()
    for _ in range(args.warmup_steps):
        engine.step()
    assert len(engine.scheduler.running) == batch, "every sequence runs: raise max_num_seqs or the KV pool"
    walls = timed_steps(engine, args.steps, args.device)
    timer.reset()
    timer.enabled = True
    timed_steps(engine, args.steps, args.device)
    timer.enabled = False
    result = {phase: timer.totals[phase] / args.steps * 1e3 for phase in PHASES}
    result["wall"] = statistics.mean(walls) * 1e3
    result["wall_median"] = statistics.median(walls) * 1e3
    # wall clock from the first run, the split from the second (its wrappers add ~1 us a call, to `other`)
    result["host"] = sum(result[phase] for phase in HOST_PHASES)
    if args.device == "cuda":
        result["device"] = device_ms(engine, args.device_repeats)
    for request_id in list(engine.requests):
        engine.abort_request(request_id)
    return result


def timed_steps(engine: Any, steps: int, device: str) -> list[float]:
    """Wall seconds of each of `steps` engine steps. The device is synchronized only before the first and
    after the last: a step returns once its tokens are on the host, and with asynchronous scheduling the
    next one is already running on the device then."""
    walls = []
    synchronize(device)
    for i in range(steps):
        start = time.perf_counter()
        engine.step()
        if i == steps - 1:
            synchronize(device)
        walls.append(time.perf_counter() - start)
    return walls


def device_ms(engine: Any, repeats: int) -> float:
    """The device's time for one decode step of the running batch: its forward, LM head and argmax, run
    back to back. With CUDA graphs, the last step's graph replays on its inputs (still in the graph's
    buffers); eager, the step's inputs are rebuilt and run again (a step then costs max(host, device))."""
    from pagoda.engine.scheduler import ScheduledSequence
    from pagoda.engine.step_inputs import build_step_inputs

    runner, n = engine.runner, len(engine.scheduler.running)
    graphs = runner.graphs
    captured = getattr(graphs, "graphs", {})
    size = next((s for s in sorted(captured) if s >= n), None)
    if size is not None:
        graph, hidden = captured[size]

        def forward() -> Any:
            graph.replay()
            return runner.model.compute_logits(hidden[:n]).argmax(dim=-1)
    else:
        # the last step's positions again: their KV slots are allocated, and rewritten with the same values
        seqs = engine.scheduler.running
        for seq in seqs:
            seq.num_computed_tokens -= 1
        inputs, _ = build_step_inputs([ScheduledSequence.of(seq, 1) for seq in seqs], runner.block_size)
        for seq in seqs:
            seq.num_computed_tokens += 1
        inputs.logit_rows = list(range(n))  # not the sequences' last tokens, but as many LM-head rows

        def forward() -> Any:
            return runner.run(inputs).argmax(dim=-1)
    forward()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        forward()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def print_table(results: dict[int, dict[str, float]], device: str) -> None:
    columns = ["wall", *PHASES, "host"] + (["device", "wall/device"] if device == "cuda" else [])
    print("\nms per decode step: the wall clock without the wrappers; the phases (exclusive) from as many")
    print("steps with them (~1 us a wrapped call, in `other`); host = " + " + ".join(HOST_PHASES))
    print("| batch | " + " | ".join(columns) + " | tok/s |")
    print("|---" * (len(columns) + 2) + "|")
    for batch, r in results.items():
        if device == "cuda":
            r["wall/device"] = r["wall"] / r["device"]
        cells = [f"{r[c]:.2f}" for c in columns]
        print(f"| {batch} | " + " | ".join(cells) + f" | {batch / r['wall'] * 1e3:,.0f} |")


def main() -> None:
    args = parse_args()
    from pagoda import LLM

    if args.device == "cpu":  # the host work is single-threaded; idle OpenMP threads only add noise
        torch.set_num_threads(1)
    options: dict[str, Any] = {}
    for item in args.engine_option:
        key, _, value = item.partition("=")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(make_model(args.shape, Path(tmp), args.tokenizer))
        llm = LLM(
            model=path, device=args.device, max_num_seqs=max(args.batch),
            max_model_len=min(2048, 128 + args.max_tokens + 64), **options,
        )
        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        timer = instrument(llm, clock)
        instrument_scheduler(llm.engine, timer)
        results = {}
        for batch in args.batch:
            results[batch] = measure(llm, timer, batch, args)
            r = results[batch]
            print(f"batch {batch}: wall {r['wall']:.2f} ms (median {r['wall_median']:.2f}), "
                  f"host {r['host']:.2f} ms", flush=True)
    print(f"\n{args.device}: {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; "
          f"model {args.model or args.shape}; torch threads {torch.get_num_threads()}; "
          f"phases timed on the {args.clock} clock")
    print_table(results, args.device)


if __name__ == "__main__":
    main()
