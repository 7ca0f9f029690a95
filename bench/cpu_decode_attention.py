"""CPU microbenchmark: the C++ paged decode-attention kernel (`torch.ops.pagoda.paged_decode_attention`) over
a model's worth of layers, each with its own paged cache whose blocks are shuffled, as the engine's are after
a while of serving. One "step" calls the kernel once per layer, one new token per sequence; contexts spread
over 143..459 tokens as in `bench.step_profile` (one sequence: 271). Prints the median step time (and the
CPU time of all threads: on a shared machine, with one thread, the figure that preemption does not inflate)
and the K/V bytes it read per second, next to what this host streams (the best of 5 float32 sums over 1 GiB at
the same thread count: the read bandwidth the kernel could at most reach). The default shapes are the
embedded SmolLM2-135M's.

    python -m bench.cpu_decode_attention --seqs 1 8 32
    python -m bench.cpu_decode_attention --library /tmp/other_build.so   # a build of another checkout
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--num-heads", type=int, default=9)
    p.add_argument("--num-kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--query-len", type=int, default=1, help="new tokens per sequence")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="KV cache dtype")
    p.add_argument("--library", type=Path, help="the operators' library to load (default: this checkout's)")
    return p.parse_args()


def contexts(num_seqs: int) -> list[int]:
    if num_seqs == 1:
        return [271]
    return [143 + 316 * i // (num_seqs - 1) for i in range(num_seqs)]


def bench(args: argparse.Namespace, num_seqs: int) -> tuple[float, float, float]:
    """Median milliseconds per step (wall clock; and the least CPU time of all threads), K/V GB/s read."""
    h, hkv, d, bs, ql = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size, args.query_len
    lens = contexts(num_seqs)
    per_seq = [math.ceil(n / bs) for n in lens]
    num_blocks = sum(per_seq)
    width = max(per_seq)
    gen = torch.Generator().manual_seed(0)
    tables = torch.zeros(num_seqs, width, dtype=torch.int32)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    slots = []
    start = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = order[start : start + n]
        start += n
        for t in range(lens[i] - ql, lens[i]):
            slots.append(int(tables[i, t // bs]) * bs + t % bs)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    query_start_loc = torch.arange(0, num_seqs * ql + 1, ql, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    dtype = getattr(torch, args.dtype)
    shape = (num_blocks, bs, hkv, d)
    caches = [
        (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
        for _ in range(args.layers)
    ]
    q = torch.randn(num_seqs * ql, h, d, generator=gen).to(dtype)
    k = torch.randn(num_seqs * ql, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_seqs * ql, hkv, d, generator=gen).to(dtype)
    op = torch.ops.pagoda.paged_decode_attention

    def step() -> None:
        for kc, vc in caches:
            op(q, k, v, kc, vc, slot_mapping, query_start_loc, tables, seq_lens, d**-0.5, 0, 0.0)

    step()
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ms = statistics.median(times) * 1e3
    kv_bytes = 2 * sum(lens) * hkv * d * dtype.itemsize * args.layers
    return ms, min(cpu) * 1e3, kv_bytes / ms / 1e6


def streaming_read_gbs() -> float:
    """This host's sequential read bandwidth at the current thread count: the best of 5 sums over 1 GiB."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def main() -> None:
    args = parse_args()
    if args.library:
        torch.ops.load_library(str(args.library))
    else:
        from pagoda.cpu_extension import available

        if not available():
            raise SystemExit("build the operators first: python -m pagoda.cpu_extension")
    print(
        f"# {torch.get_num_threads()} threads, {args.layers} layers, "
        f"heads {args.num_heads}/{args.num_kv_heads}, head_dim {args.head_dim}, block {args.block_size}, "
        f"query_len {args.query_len}, {args.dtype}"
    )
    stream = streaming_read_gbs()
    print(f"# this host streams {stream:.1f} GB/s (float32 sum over 1 GiB)")
    for n in args.seqs:
        ms, cpu_ms, gbs = bench(args, n)
        print(
            f"seqs {n:3d}  step {ms:8.3f} ms (min CPU {cpu_ms:8.3f} ms)  "
            f"per layer {ms / args.layers * 1e3:7.1f} us  K/V {gbs:6.2f} GB/s "
            f"({gbs / stream:.0%} of streaming)"
        )


if __name__ == "__main__":
    main()
