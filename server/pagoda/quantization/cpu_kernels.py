"""Quantized matmuls on the CPU with torch's packed-weight kernels.

torch ships two weight-only kernels for x86/ARM CPUs: `_weight_int8pack_mm` (int8, one scale per output
row) and `_weight_int4pack_mm_for_cpu` (4-bit, a scale and a zero per group of 32..256 inputs, computing
`(q - 8) * scale + zero`). Both are fast only with bfloat16 activations (measured on AVX-512: with
float32 ones they run 10-40x slower than a float32 matmul; with bfloat16 ones 0.7-1.3x its time), so
activations are rounded to bfloat16 for the product and the result comes back in their own dtype.

An 8-bit grouped weight (Q8_0, Q5_x) is exactly the sum of two 4-bit ones, q = 16 * hi + lo with both
halves in 0..15 after the shifts below, so it runs as two int4 products without losing a bit. Shapes the
kernels cannot take (groups of 16, as in Q6_K, or fewer than 16 rows at a time) dequantize on the fly.

The int4 kernel dequantizes its weight tiles again for every 4 rows of activations, so its time grows
with the rows; a dense copy of the weight (`dense_dtype`), when kept, serves steps of `DENSE_MIN_ROWS` or
more rows with a BLAS GEMM (AMX / AVX512-BF16 on bfloat16), whose time barely grows.

Where Pagoda's C++ operators are built with AVX-512 VNNI or AVX2 (an x86-64-v3 image),
`torch.ops.pagoda.tiled_matmul` (csrc/tiled_matmul.cpp) takes GGUF's 4- and 8-bit weights, in its own layout
instead of torch's (`kernel_for` decides). Elsewhere `torch.ops.pagoda.grouped_matmul`
(csrc/grouped_matmul.cpp) takes the weights it computes faster (`prefers_grouped_kernel`): 8-bit grouped
weights (one pass instead of two int4 ones), and 4-bit ones where torch's int4 kernel runs without its
AVX-512 code. It multiplies the activations in float32 as they come (no rounding to bfloat16).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F

from pagoda import cpu_extension
from pagoda.quantization.grouped import GroupQuantized

_INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_ROW_MULTIPLE = 16
_KERNEL_DTYPE = torch.bfloat16
# rows from which the dense GEMM beats the int4 kernel (measured on 2 Sapphire Rapids cores, the model's
# shapes: 0.8x its time at 8 rows, 1.9x at 16, 2x at 32, 4.7x at 64)
DENSE_MIN_ROWS = 16


def _int4_kernel_fits(weight: GroupQuantized) -> bool:
    return weight.group_size in _INT4_GROUP_SIZES and weight.shape[0] % _INT4_ROW_MULTIPLE == 0


def grouped_kernel_fits(weight: GroupQuantized) -> bool:
    """Shapes `grouped_matmul` takes: 8-bit groups of a multiple of 16 inputs; 4-bit groups of a multiple
    of 32 in rows of a multiple of 64 (its packing)."""
    k, size = weight.shape[1], weight.group_size
    return size % 16 == 0 if weight.bits == 8 else size % 32 == 0 and k % 64 == 0


def prefers_grouped_kernel(weight: GroupQuantized) -> bool:
    """Whether the C++ kernel beats torch's packed one. Speed-ups over it per matmul of SmolLM2-135M's
    shapes, one core, weights streaming from memory as in a model: 8-bit weights 1.1x at 1 row, 2.0x at 8
    (one pass against two int4 ones; 2.5x and 2.1x under torch's AVX2 code); 4-bit ones 1.2-1.4x at 1 row,
    0.8-1.25x at 8 under torch's AVX2 code (float32 activations, ATEN_CPU_CAPABILITY=avx2, this library
    built for x86-64-v3), but 0.55-1.0x against its AVX-512 code, which therefore keeps them."""
    if not (grouped_kernel_fits(weight) and cpu_extension.available()):
        return False
    return weight.bits == 8 or torch.backends.cpu.get_cpu_capability() != "AVX512"


class GroupedWeight:
    """A weight in `grouped_matmul`'s layout: int8 [N, K] as it is; 4-bit [N, K / 2] uint8, each run of 64
    inputs as 32 bytes whose low nibbles hold inputs 0..31 and high nibbles 32..63."""

    def __init__(self, weight: GroupQuantized) -> None:
        n, k = weight.shape
        self.bits = weight.bits
        if weight.bits == 8:
            self.q = weight.q.contiguous()
        else:
            runs = weight.q.view(n, k // 64, 2, 32).to(torch.uint8)
            self.q = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        self.scale = weight.scale.float().contiguous()
        self.offset = None if weight.offset is None else weight.offset.float().contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 or bfloat16 (others go through float32) -> x @ w.T in x's dtype."""
        xk = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        out = torch.ops.pagoda.grouped_matmul(xk, self.q, self.scale, self.offset, self.bits)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.q, self.scale, self.offset) if t is not None]


@functools.cache
def tiled_kernel_built() -> bool:
    """Whether this machine's build of Pagoda's operators has `tiled_matmul` (AVX-512 VNNI or AVX2)."""
    return cpu_extension.available() and bool(torch.ops.pagoda.tiled_matmul_isa())


def tiled_kernel_fits(weight: GroupQuantized) -> bool:
    """Weights `tiled_matmul` takes: a multiple of 16 rows, groups of 32 or 64 inputs (GGUF's Q4_0, Q4_1,
    Q8_0), scales and offsets that float16 holds exactly (GGUF's are float16)."""
    exact = all(t is None or torch.equal(t.half().float(), t) for t in (weight.scale, weight.offset))
    return weight.shape[0] % 16 == 0 and weight.group_size in (32, 64) and exact


class TiledWeight:
    """A weight in `tiled_matmul`'s layout (csrc/tiled_matmul.cpp): uint8 [N / 16, tile bytes], each tile 16
    output rows, group by group: runs of 32 inputs as 64-byte loads whose byte 4 * i + b holds row i's
    inputs (4 bits: 8 * load + b in the low nibble, 8 * load + 4 + b in the high one; 8 bits: 4 * load + b),
    then the group's float16 scales and offsets, and for 8 bits the rows' int16 sums of q over the group."""

    def __init__(self, weight: GroupQuantized) -> None:
        n, k = weight.shape
        tiles, groups, size = n // 16, k // weight.group_size, weight.group_size
        if weight.bits == 4:
            # q[16 * tile + i, 32 * run + 8 * load + 4 * half + b] -> [tile, run, load, i, b, half]
            q = weight.q.to(torch.uint8).view(tiles, 16, k // 32, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
            runs = q[..., 0] | (q[..., 1] << 4)
        else:  # q[16 * tile + i, 32 * run + 4 * load + b] -> [tile, run, load, i, b]
            runs = weight.q.view(torch.uint8).view(tiles, 16, k // 32, 8, 4).permute(0, 2, 3, 1, 4)
        parts = [runs.reshape(tiles, groups, size * 16 * weight.bits // 8)]
        sums = weight.q.view(n, groups, size).sum(dim=2, dtype=torch.int16) if weight.bits == 8 else None
        for t in (weight.scale.half(), None if weight.offset is None else weight.offset.half(), sums):
            if t is not None:  # [tile, group, 16], as bytes
                parts.append(t.view(tiles, 16, groups).transpose(1, 2).contiguous().view(torch.uint8))
        self.w = torch.cat(parts, dim=-1).reshape(tiles, -1).contiguous()
        self.bits = weight.bits
        self.group_size = size
        self.has_offset = weight.offset is not None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ w.T in x's dtype (float32 and bfloat16 as they are, others through float32)."""
        xk = x if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        xk = xk if xk.stride(1) == 1 else xk.contiguous()
        out = torch.ops.pagoda.tiled_matmul(xk, self.w, self.bits, self.group_size, self.has_offset)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.w]


class Int4Term:
    """One `_weight_int4pack_mm_for_cpu` operand: w = (q - 8) * scale + zero, q in 0..15."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.group_size = q.shape[1] // scale.shape[1]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # [K / G, N, 2], the layout the kernel reads
        self.scale_and_zero = torch.stack((scale.T, zero.T), dim=-1).to(_KERNEL_DTYPE).contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scale_and_zero
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scale_and_zero]


def int4_terms(weight: GroupQuantized) -> list[Int4Term]:
    """The weight as a sum of int4 kernel operands (one for 4-bit weights, two for 8-bit ones)."""
    offset = torch.zeros_like(weight.scale) if weight.offset is None else weight.offset
    scale, q = weight.scale, weight.q
    if weight.bits == 4:
        return [Int4Term(q, scale, offset + 8 * scale)]
    # int8 q = 16 * (hi - 8) + lo with hi = (q >> 4) + 8 and lo = q & 15, both in 0..15:
    # w = 16 * scale * (hi - 8) + [scale * (lo - 8) + 8 * scale + offset]
    hi, lo = (q >> 4) + 8, q & 15
    return [Int4Term(hi, 16 * scale, torch.zeros_like(scale)), Int4Term(lo, scale, offset + 8 * scale)]


# rows of float32 temporaries per step of `dense_copy`: a few hundred KiB, so they stay in the cache
_DENSE_CHUNK_BYTES = 1 << 20


def dense_copy(weight: GroupQuantized, dtype: torch.dtype) -> torch.Tensor:
    """`weight.dequantize(dtype)`, bit for bit (the same float32 products and sums), a block of rows at a
    time in place: 2-3x faster than whole-tensor temporaries, which go through memory several times."""
    n, k = weight.shape
    groups, size = k // weight.group_size, weight.group_size
    out = torch.empty(n, k, dtype=dtype)
    step = max(1, _DENSE_CHUNK_BYTES // (4 * k))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        chunk = weight.q[rows].view(-1, groups, size).float().mul_(weight.scale[rows, :, None])
        if weight.offset is not None:
            chunk.add_(weight.offset[rows, :, None])
        out[rows] = chunk.view(-1, k)
    return out


Kernel = Literal["int8_per_channel", "tiled", "grouped", "int4", "fallback"]


def kernel_for(weight: GroupQuantized) -> Kernel:
    """Which kernel serves a weight's steps below `DENSE_MIN_ROWS` rows (the one place that decides):

    - int8 with one scale per row: torch's `_weight_int8pack_mm`;
    - weights `tiled_matmul` fits (GGUF's Q4_0, Q4_1, Q8_0), where the build has its AVX-512 VNNI or its
      AVX2 code: it, at every row count it serves. One thread, medians of 8-20 runs on a shared, noisy 2-core
      Sapphire Rapids VM (`python -m bench.tiled_matmul`), SmolLM2-135M's 4-bit shapes (576x960, 576x576,
      576x3072, 1536x576; groups of 32; weights streaming from 30 copies as in a model) and its Q8_0 LM
      head (576x49152). AVX-512 VNNI, bfloat16 activations: against torch's AVX-512 int4 kernel 1.3-2.1x at
      1 row, 1.6-2.2x at 4, 1.9-2.7x at 8; against `grouped_matmul` on the head 1.3-1.6x at 1 row, 1.4-1.5x
      at 4, 1.9-2.5x at 8 (1.7-4x against two int4 terms). AVX2 (`--isa avx2`: the x86-64-v3 build, torch
      capped at AVX2, float32 activations as an AVX2 host's models run; load ~9 on the 2 cores): against
      torch's int4 kernel (bfloat16 products, as `CpuQuantizedWeight` calls it) 2.0-2.45x at 1 row,
      1.8-2.0x at 4, 1.7-2.2x at 8; against `grouped_matmul` (which AVX2 hosts used) 1.5-2.0x, 1.3-1.5x,
      1.4-2.0x; on the head 1.25x, 1.16x, 1.65x against `grouped_matmul` (2.5-4.4x against two int4 terms).
      A whole decode step there (`python -m bench.step_profile --isa avx2`, one thread, the embedded SmolLM2
      GGUF) took 22-26 ms instead of 26-49 at 1 sequence, 129-134 ms instead of 140-159 at 8;
    - other weights `grouped_matmul` takes, where it beats torch's kernels (`prefers_grouped_kernel`);
    - torch's int4 kernel where it fits (8-bit weights as two 4-bit terms), else dequantize on the fly."""
    if weight.group_size == weight.shape[1] and weight.bits == 8 and weight.offset is None:
        return "int8_per_channel"
    if tiled_kernel_fits(weight) and tiled_kernel_built():
        return "tiled"
    if prefers_grouped_kernel(weight):
        return "grouped"
    return "int4" if _int4_kernel_fits(weight) else "fallback"


class CpuQuantizedWeight:
    """A GroupQuantized weight repacked once for the fastest CPU kernel that serves it (`kernel_for`): exact
    products, but for the tiled kernel's activations in 14-bit fixed point (bound: csrc/tiled_matmul.cpp)."""

    def __init__(self, weight: GroupQuantized, dense_dtype: torch.dtype | None = None) -> None:
        self.per_channel_int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int4_terms: list[Int4Term] = []
        self.tiled: TiledWeight | None = None
        self.grouped: GroupedWeight | None = None
        self.fallback: GroupQuantized | None = None
        self.dense = None if dense_dtype is None else dense_copy(weight, dense_dtype)
        kernel = kernel_for(weight)
        if kernel == "int8_per_channel":
            self.per_channel_int8 = (weight.q.contiguous(), weight.scale[:, 0].to(_KERNEL_DTYPE))
        elif kernel == "tiled":
            self.tiled = TiledWeight(weight)
        elif kernel == "grouped":
            self.grouped = GroupedWeight(weight)
        elif kernel == "int4":
            self.int4_terms = int4_terms(weight)
        else:
            self.fallback = weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ w.T [M, N], in x's dtype."""
        if self.dense is not None and x.shape[0] >= DENSE_MIN_ROWS:  # kept in the activations' dtype
            return F.linear(x, self.dense)
        if self.tiled is not None:
            return self.tiled.matmul(x)
        if self.grouped is not None:
            return self.grouped.matmul(x)
        if self.fallback is not None:
            return F.linear(x, self.fallback.dequantize(x.dtype))
        # (a step of one sequence calls this ~120 times: skip the no-op casts of bfloat16 activations)
        xk = x if x.dtype == _KERNEL_DTYPE else x.to(_KERNEL_DTYPE)
        if self.per_channel_int8 is not None:
            out = torch._weight_int8pack_mm(xk, *self.per_channel_int8)
        else:
            out = self.int4_terms[0].matmul(xk)
            for term in self.int4_terms[1:]:
                out += term.matmul(xk)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return self._kernel_tensors() + ([] if self.dense is None else [self.dense])

    def _kernel_tensors(self) -> list[torch.Tensor]:
        if self.fallback is not None:
            return [t for t in (self.fallback.q, self.fallback.scale, self.fallback.offset) if t is not None]
        if self.per_channel_int8 is not None:
            return list(self.per_channel_int8)
        if self.tiled is not None:
            return self.tiled.tensors()
        if self.grouped is not None:
            return self.grouped.tensors()
        return [t for term in self.int4_terms for t in term.tensors()]

