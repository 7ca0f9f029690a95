"""`tiled_matmul` (csrc/tiled_matmul.cpp) against the kernels it replaces, per matmul of SmolLM2-135M's
shapes: the 4-bit layers (Q4_1-like, groups of 32) against torch's int4 kernel, with 30 copies of each
weight so they stream from memory as in a model; the Q8_0 LM head against `grouped_matmul` and torch's int4
kernel (two terms). One thread (CPU time of the thread, so other processes on a shared machine count less),
medians, bfloat16 activations; with `--isa avx2`, an AVX2 host's: this library built for x86-64-v3, torch's
kernels capped at AVX2 (`bench.step_profile`'s caps) and float32 activations (an AVX2 host's dtype).

    python -m bench.tiled_matmul [--isa avx2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bench import step_profile
from pagoda import cpu_extension
from pagoda.quantization.cpu_kernels import GroupedWeight, TiledWeight, int4_terms, tiled_kernel_built
from pagoda.quantization.grouped import GroupQuantized

Matmul = Callable[[torch.Tensor], torch.Tensor]
LAYER_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # K x N: qkv, o, gate_up, down
HEAD = (576, 49152)


def random_weight(n: int, k: int, bits: int) -> GroupQuantized:
    low, high = (0, 16) if bits == 4 else (-128, 128)
    q = torch.randint(low, high, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // 32) * 0.05 + 1e-3).half().float()
    offset = (torch.randn(n, k // 32) * 0.1).half().float() if bits == 4 else None
    return GroupQuantized(q, scale, offset, bits)


def per_call_us(matmuls: list[Matmul], x: torch.Tensor) -> float:
    start = time.thread_time()
    for matmul in matmuls:
        matmul(x)
    return (time.thread_time() - start) / len(matmuls) * 1e6


def compare(kernels: dict[str, list[Matmul]], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median microseconds per call of each kernel, the kernels alternated."""
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, matmuls in kernels.items():
            times[name].append(per_call_us(matmuls, x))
    return {name: statistics.median(t) for name, t in times.items()}


def as_engine_calls(matmul: Matmul) -> Matmul:
    """torch's int4 kernel as `CpuQuantizedWeight` calls it: bfloat16 activations, the result cast back."""
    return lambda x: matmul(x.bfloat16()).to(x.dtype)


def two_terms(weight: GroupQuantized) -> Matmul:
    terms = int4_terms(weight)
    return as_engine_calls(lambda x: terms[0].matmul(x) + terms[1].matmul(x))


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--isa", choices=sorted(step_profile.ISA_ENV), help="run as on a host with only this")
    args = parser.parse_args()
    if args.isa:
        step_profile.reexec_under_isa(args.isa, "bench.tiled_matmul")
        step_profile.use_avx2_extension()
    assert cpu_extension.available() and tiled_kernel_built(), "needs the tiled kernel built"
    dtype = torch.float32 if args.isa else torch.bfloat16
    print(f"torch kernels {torch.backends.cpu.get_cpu_capability()}, tiled kernel "
          f"{torch.ops.pagoda.tiled_matmul_isa()}, {dtype} activations", file=sys.stderr)  # fmt: skip
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for k, n in LAYER_SHAPES:
        weights = [random_weight(n, k, 4) for _ in range(30)]
        kernels: dict[str, list[Matmul]] = {
            "torch int4": [as_engine_calls(int4_terms(w)[0].matmul) for w in weights],
            "grouped": [GroupedWeight(w).matmul for w in weights],
            "tiled": [TiledWeight(w).matmul for w in weights],
        }
        for rows in (1, 4, 8):
            t = compare(kernels, torch.randn(rows, k).to(dtype), 20)
            tiled = t["tiled"]
            ratios = f"{t['torch int4'] / tiled:.2f}x torch int4, {t['grouped'] / tiled:.2f}x grouped"
            print(f"{k}x{n} Q4 {rows} rows: " + ", ".join(f"{name} {v:6.1f} us" for name, v in t.items())
                  + f" ({ratios})", flush=True)  # fmt: skip
    k, n = HEAD
    head = random_weight(n, k, 8)
    kernels = {
        "torch int4 x2": [two_terms(head)],
        "grouped": [GroupedWeight(head).matmul],
        "tiled": [TiledWeight(head).matmul],
    }
    for rows in (1, 4, 8):
        t = compare(kernels, torch.randn(rows, k).to(dtype), 8)
        print(f"{k}x{n} Q8 {rows} rows: " + ", ".join(f"{name} {v / 1e3:.2f} ms" for name, v in t.items())
              + f" ({t['grouped'] / t['tiled']:.2f}x grouped)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
