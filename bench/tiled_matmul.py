"""`tiled_matmul` (csrc/tiled_matmul.cpp) against the kernels it replaces, per matmul of SmolLM2-135M's
shapes: the 4-bit layers (Q4_1-like, groups of 32) against torch's int4 kernel, with 30 copies of each
weight so they stream from memory as in a model; the Q8_0 LM head against `grouped_matmul` and torch's int4
kernel (two terms). One thread (CPU time of the thread, so other processes on a shared machine count less),
medians, bfloat16 activations.

    python -m bench.tiled_matmul
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

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


def two_terms(weight: GroupQuantized) -> Matmul:
    terms = int4_terms(weight)
    return lambda x: terms[0].matmul(x) + terms[1].matmul(x)


def main() -> None:
    assert cpu_extension.available() and tiled_kernel_built(), "needs the built operators and AVX-512 VNNI"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for k, n in LAYER_SHAPES:
        weights = [random_weight(n, k, 4) for _ in range(30)]
        kernels = {
            "torch int4": [int4_terms(w)[0].matmul for w in weights],
            "tiled": [TiledWeight(w).matmul for w in weights],
        }
        for rows in (1, 4, 8):
            t = compare(kernels, torch.randn(rows, k).bfloat16(), 20)
            speedup = t["torch int4"] / t["tiled"]
            print(f"{k}x{n} Q4 {rows} rows: torch int4 {t['torch int4']:6.1f} us, tiled {t['tiled']:6.1f} us"
                  f" ({speedup:.2f}x)", flush=True)  # fmt: skip
    k, n = HEAD
    head = random_weight(n, k, 8)
    kernels = {
        "torch int4 x2": [two_terms(head)],
        "grouped": [GroupedWeight(head).matmul],
        "tiled": [TiledWeight(head).matmul],
    }
    for rows in (1, 4, 8):
        t = compare(kernels, torch.randn(rows, k).bfloat16(), 8)
        print(f"{k}x{n} Q8 {rows} rows: " + ", ".join(f"{name} {v / 1e3:.2f} ms" for name, v in t.items())
              + f" ({t['grouped'] / t['tiled']:.2f}x grouped)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
