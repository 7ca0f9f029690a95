"""GPU single-stream decode against the memory-bandwidth bound, on an 8B Llama-shaped model.

The model has Llama 3 8B's shape (32 layers, hidden 4096, 32 query / 8 KV heads, intermediate 14336, vocab
128256, untied head) and random bfloat16 weights (`load_format="dummy"`: no hub access). One request with a
128-token prompt decodes greedily with the engine's defaults (CUDA graphs, asynchronous scheduling); the time
per output token is the difference between a long and a one-token generation, over the extra tokens. The
same engine without asynchronous scheduling runs alternately with it, as the baseline.

The bound: every decode step reads each weight once (the embedding table excepted: one row) and the
sequence's K/V, at the bandwidth a large device-to-device copy reaches on this card (bytes read + written
over time), measured in the same run. Prints the time per token, the bound, and their ratio.

    python -m bench.gpu_decode --out /tmp/gpu-decode.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import triton.testing

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
PROMPT_TOKENS = 128


def copy_bandwidth(gib: int = 4) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written (median of repeats)."""
    src = torch.randn(gib << 29, dtype=torch.bfloat16, device="cuda")  # gib GiB of 2-byte elements
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=300, return_mode="median")
    return 2 * (gib << 30) / (ms / 1e3)


def bytes_per_step(model: torch.nn.Module, context: int, spec: dict[str, Any]) -> int:
    """Weights read by one decode step (all but the embedding table) plus the K/V of `context` tokens."""
    weights = sum(
        p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name
    )
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    kv = context * spec["num_hidden_layers"] * 2 * spec["num_key_value_heads"] * head_dim * 2
    return weights + kv


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256, help="output tokens of the timed generation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="then profile an N-token generation and print the kernels' device time per token",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from transformers import LlamaConfig

    from pagoda import LLM, SamplingParams

    bandwidth = copy_bandwidth()
    torch.cuda.empty_cache()  # give the copy's buffers back before the engine sizes its KV pool
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(10, 128000) for _ in range(PROMPT_TOKENS)]}
    with tempfile.TemporaryDirectory() as tmp:
        LlamaConfig(**LLAMA3_8B, torch_dtype="bfloat16").save_pretrained(tmp)
        start = time.perf_counter()
        llm = LLM(
            model=tmp, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=2048,
            max_num_seqs=4, enforce_eager=args.enforce_eager,
        )
        load = time.perf_counter() - start

    def generate(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        out = llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
        assert len(out[0].outputs[0].token_ids) == n
        return time.perf_counter() - t0

    runner = llm.engine.runner
    run_ahead = runner.run_ahead  # asynchronous scheduling (on by default with CUDA graphs)

    def time_per_token(asynchronous: bool) -> float:
        runner.run_ahead = run_ahead if asynchronous else None
        return (generate(1 + args.tokens) - generate(1)) / args.tokens

    generate(16)  # warm-up
    # the same engine with and without asynchronous scheduling, alternated
    times: dict[bool, list[float]] = {True: [], False: []}
    modes = [True, False] if run_ahead is not None else [False]
    for _ in range(args.repeats):
        for asynchronous in modes:
            times[asynchronous].append(time_per_token(asynchronous))
    runner.run_ahead = run_ahead
    per_token = statistics.median(times[run_ahead is not None])
    model = llm.engine.runner.model
    step_bytes = bytes_per_step(model, PROMPT_TOKENS + args.tokens // 2, LLAMA3_8B)
    bound = step_bytes / bandwidth
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "cuda_graphs": not args.enforce_eager,
        "load_seconds": load,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "bytes_per_step_gb": step_bytes / 1e9,
        "ms_per_token": per_token * 1e3,
        "tokens_per_s": 1 / per_token,
        "bound_ms_per_token": bound * 1e3,
        "achieved_bandwidth_gb_s": step_bytes / per_token / 1e9,
        "fraction_of_bound": bound / per_token,
        "async_scheduling": run_ahead is not None,
    }
    if times[False] and run_ahead is not None:
        synchronous = statistics.median(times[False])
        result |= {"sync_ms_per_token": synchronous * 1e3, "sync_fraction_of_bound": bound / synchronous}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.profile:
        print_kernel_profile(lambda: generate(args.profile), args.profile)


def print_kernel_profile(run: Any, tokens: int) -> None:
    """The CUDA kernels of `run` (inside the decode graphs too), by device time per token: what the step
    spends beside the weight-reading matmuls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows)
    print(f"device time per token {total / tokens / 1e3:.3f} ms over {tokens} tokens; top kernels:")
    print("  us/token  calls/token  kernel")
    for e in rows[:25]:
        print(f"  {e.device_time_total / tokens:8.1f}  {e.count / tokens:11.1f}  {e.key[:110]}")


if __name__ == "__main__":
    main()
