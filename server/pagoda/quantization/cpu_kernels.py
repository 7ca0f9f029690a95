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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.quantization.grouped import GroupQuantized

_INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_ROW_MULTIPLE = 16
_KERNEL_DTYPE = torch.bfloat16
# rows from which the dense GEMM beats the int4 kernel (measured on 2 Sapphire Rapids cores, the model's
# shapes: 0.8x its time at 8 rows, 1.9x at 16, 2x at 32, 4.7x at 64)
DENSE_MIN_ROWS = 16


def _int4_kernel_fits(weight: GroupQuantized) -> bool:
    return weight.group_size in _INT4_GROUP_SIZES and weight.shape[0] % _INT4_ROW_MULTIPLE == 0


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


class CpuQuantizedWeight:
    """A GroupQuantized weight repacked once for the fastest CPU kernel that computes it exactly."""

    def __init__(self, weight: GroupQuantized, dense_dtype: torch.dtype | None = None) -> None:
        self.per_channel_int8: tuple[torch.Tensor, torch.Tensor] | None = None
        self.int4_terms: list[Int4Term] = []
        self.fallback: GroupQuantized | None = None
        self.dense = None if dense_dtype is None else dense_copy(weight, dense_dtype)
        if weight.group_size == weight.shape[1] and weight.bits == 8 and weight.offset is None:
            self.per_channel_int8 = (weight.q.contiguous(), weight.scale[:, 0].to(_KERNEL_DTYPE))
        elif _int4_kernel_fits(weight):
            self.int4_terms = int4_terms(weight)
        else:
            self.fallback = weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ w.T [M, N], in x's dtype."""
        if self.dense is not None and x.shape[0] >= DENSE_MIN_ROWS:  # kept in the activations' dtype
            return F.linear(x, self.dense)
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
        return [t for term in self.int4_terms for t in term.tensors()]
