"""Dequantize-in-the-matmul on the GPU: one Triton kernel for every GroupQuantized weight.

A program computes a BLOCK_M x BLOCK_N tile of x @ w.T. For each BLOCK_K slice of the inputs it loads
the packed integers of its BLOCK_N weight rows, their scales (and offsets), dequantizes them in
registers and feeds them to `tl.dot` in the activations' dtype: the float weight never exists in
memory. 4-bit weights are packed two per byte (element 2j in the low nibble of byte j, 2j+1 in the
high one); 8-bit ones are plain int8. Tested on the CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.quantization.grouped import GroupQuantized

# The interpreter multiplies the raw bits of bfloat16 operands in tl.dot (triton-lang/triton#11584), and
# is slow anyway: there the dots take float32 operands.
_INTERPRETED = triton.knobs.runtime.interpret
_DOT_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _dequant_matmul_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # uint8 [N, K // 2] when BITS == 4, int8 [N, K] when BITS == 8
    scale_ptr,  # float32 [N, K // GROUP]
    offset_ptr,  # float32 [N, K // GROUP]; unread unless HAS_OFFSET
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :])
        w_mask = k_ok[:, None] & col_ok[None, :]  # the weight tile is [BLOCK_K, BLOCK_N]: w.T
        if BITS == 4:
            packed = tl.load(q_ptr + cols[None, :] * stride_qn + (ks // 2)[:, None], mask=w_mask, other=0)
            q = ((packed >> ((ks % 2) * 4)[:, None]) & 0xF).to(tl.float32)
        else:
            q = tl.load(q_ptr + cols[None, :] * stride_qn + ks[:, None], mask=w_mask, other=0).to(tl.float32)
        group_at = cols[None, :] * stride_sn + (ks // GROUP)[:, None]
        w = q * tl.load(scale_ptr + group_at, mask=w_mask, other=0.0)
        if HAS_OFFSET:
            w += tl.load(offset_ptr + group_at, mask=w_mask, other=0.0)
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE))
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


class TritonQuantizedWeight:
    """A GroupQuantized weight in the Triton kernel's layout, on the weight's device."""

    def __init__(self, weight: GroupQuantized) -> None:
        n, k = weight.shape
        self.bits, self.group_size, self.shape = weight.bits, weight.group_size, (n, k)
        if weight.bits == 4:
            q = weight.q.to(torch.uint8).view(n, k // 2, 2)
            self.q = (q[..., 0] | (q[..., 1] << 4)).contiguous()
        else:
            self.q = weight.q.contiguous()
        self.scale = weight.scale.float().contiguous()
        self.offset = None if weight.offset is None else weight.offset.float().contiguous()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ w.T [M, N], in x's dtype."""
        n, k = self.shape
        x = x.contiguous()
        m = x.shape[0]
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n, block_k = 64, 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        dot_dtype = tl.float32 if _INTERPRETED else _DOT_DTYPE[x.dtype]
        _dequant_matmul_kernel[grid](
            x,
            self.q,
            self.scale,
            self.scale if self.offset is None else self.offset,
            out,
            m,
            n,
            k,
            x.stride(0),
            self.q.stride(0),
            self.scale.stride(0),
            out.stride(0),
            GROUP=self.group_size,
            BITS=self.bits,
            HAS_OFFSET=self.offset is not None,
            DOT_DTYPE=dot_dtype,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
        )
        return out

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.q, self.scale, self.offset) if t is not None]
