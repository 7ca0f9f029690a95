"""One-launch Triton kernels for the element-wise layers (RMSNorm, RoPE, SiLU-and-mul) on CUDA tensors.

Imported only where a tensor is on CUDA (never on the CPU path, never at start-up). Each kernel repeats
the float operations of the torch code it replaces, with the same roundings: every product or sum that
torch rounds to the activations' dtype is rounded here too, in the same order. So the results equal
torch's bit for bit, except RMSNorm's mean of squares, whose summation order is the reduction's own.

Two details keep them exact: fp contraction is off (an fma rounds once where torch rounds twice), and
float32 -> bfloat16 rounds to nearest-even with integer ops (`_round`), which also makes the Triton
interpreter (whose own bf16 cast truncates) compute what the compiled kernel computes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the interpreter has no libdevice; numpy's exp stands in for it there
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_LAUNCH = {"enable_fp_fusion": False}
_MAX_DIM = 16384  # a row (RMSNorm) or head (RoPE) that fits one program's registers

if _INTERPRETED:

    @triton.jit
    def _exp(x):
        return tl.exp(x)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _exp(x):
        # expf, as torch's CUDA silu calls it (tl.exp would be the faster, less exact ex2.approx)
        return libdevice.exp(x)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 x rounded to `dtype`'s precision (round to nearest even), still as float32."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, residual_ptr, sum_ptr, inner, stride_outer, stride_inner, dim, eps,
    UNIT_OFFSET: tl.constexpr, ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # offsets past 2**31 elements in long prefills
    x_ptr += (row // inner) * stride_outer + (row % inner) * stride_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:  # x + residual, rounded to the activations' dtype as torch's add rounds it, normalised
        x = _round(x + tl.load(residual_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32),
                   x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * dim + cols, x.to(sum_ptr.dtype.element_ty), mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # F.rms_norm on float32: x * rsqrt(mean(x^2) + eps)
    normed = x * tl.math.rsqrt(tl.math.div_rn(tl.sum(x * x, axis=0), dim.to(tl.float32)) + eps)
    act_dtype = x_ptr.dtype.element_ty
    if UNIT_OFFSET:  # Gemma: (normed * (1 + w)) in float32, then the cast
        y = _round(normed * (1.0 + w), act_dtype)
    else:  # Llama: the cast, then w * normed in the (promoted) output dtype
        y = _round(w * _round(normed, act_dtype), out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * dim + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor | None:
    """RMSNorm.forward's result in one launch, or None where the layout is not one this kernel reads."""
    dim = x.shape[-1]
    if x.dim() not in (2, 3) or x.stride(-1) != 1 or dim > _MAX_DIM or not weight.is_contiguous():
        return None
    out = torch.empty(x.shape, dtype=_norm_dtype(x, weight, unit_offset), device=x.device)
    inner = x.shape[1] if x.dim() == 3 else 1
    stride_inner = x.stride(1) if x.dim() == 3 else 0
    _launch_rms_norm(x, weight, out, None, None, inner, stride_inner, eps, unit_offset)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(RMSNorm.forward(x + residual), x + residual) for rows [N, D] in one launch, or None where the
    layout is not one this kernel reads."""
    dim = x.shape[-1]
    if (
        x.dim() != 2 or x.stride(-1) != 1 or dim > _MAX_DIM or not weight.is_contiguous()
        or residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous()
    ):
        return None
    out = torch.empty(x.shape, dtype=_norm_dtype(x, weight, unit_offset), device=x.device)
    summed = torch.empty_like(residual)
    _launch_rms_norm(x, weight, out, residual, summed, 1, 0, eps, unit_offset)
    return out, summed


def _norm_dtype(x: torch.Tensor, weight: torch.Tensor, unit_offset: bool) -> torch.dtype:
    return x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)


def _launch_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None,
    summed: torch.Tensor | None, inner: int, stride_inner: int, eps: float, unit_offset: bool,
) -> None:
    dim = x.shape[-1]
    rows = x.numel() // dim
    if rows == 0:
        return
    _rms_norm_kernel[(rows,)](
        x, weight, out, residual, summed, inner, x.stride(0), stride_inner, dim, eps,
        UNIT_OFFSET=unit_offset, ADD_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(dim),
        num_warps=4 if dim <= 4096 else 8, **_LAUNCH,
    )


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, half, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < half
    gate = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_row + half + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # F.silu computes x / (1 + exp(-x)) in float32 and rounds it; the product by up rounds again
    act = _round(tl.math.div_rn(gate, 1.0 + _exp(-gate)), dtype)
    tl.store(out_ptr + row * half + cols, _round(act * up, dtype).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """F.silu(gate) * up for x = [..., gate | up] in one launch, or None for a layout it does not read."""
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[-1] % 2:
        return None
    rows, half = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, half, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = min(1024, triton.next_power_of_2(half))
    _silu_and_mul_kernel[(rows, triton.cdiv(half, block))](
        x, out, half, x.stride(0), BLOCK=block, num_warps=4, **_LAUNCH
    )
    return out


@triton.jit
def _rotated(row, cos_row, sin_row, cols, mask, dim, dtype: tl.constexpr):
    """Heads [BLOCK_H, BLOCK_D] at `row` (+ head offsets) times one token's cos / signed sin: x * cos +
    x.roll(dim // 2) * signed_sin, each product rounded to the dtype, then their sum, as torch computes it."""
    half = dim // 2
    rolled = tl.where(cols < half, cols + half, cols - half)  # x.roll(dim // 2): [x2, x1]
    col_mask = cols < dim
    x = tl.load(row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_rolled = tl.load(row + rolled[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_row + cols, mask=col_mask, other=0.0).to(tl.float32)
    return _round(_round(x * cos[None, :], dtype) + _round(x_rolled * sin[None, :], dtype), dtype)


@triton.jit
def _rotate_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, stride_xt, stride_xh, stride_ct, stride_st, dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    mask = (heads[:, None] < num_heads) & col_mask[None, :]
    row = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    dtype = out_ptr.dtype.element_ty
    y = _rotated(row, cos_ptr + token * stride_ct, sin_ptr + token * stride_st, cols, mask, dim, dtype)
    out = out_ptr + token * num_heads * dim + heads[:, None] * dim + cols[None, :]
    tl.store(out, y.to(dtype), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor | None:
    """RotaryEmbedding._rotate for heads x [N, H, D] (strided views too) and cos/signed_sin [N, 1, D] in
    x's dtype, in one launch; None for any other layout."""
    if (
        x.dim() != 3
        or x.stride(-1) != 1
        or x.shape[-1] % 2
        or x.shape[-1] > _MAX_DIM
        or any(t.shape != (x.shape[0], 1, x.shape[2]) or t.stride(-1) != 1 for t in (cos, signed_sin))
        or not x.dtype == cos.dtype == signed_sin.dtype
    ):
        return None
    tokens, num_heads, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(dim)
    block_h = max(1, min(triton.next_power_of_2(num_heads), 2048 // block_d))
    _rotate_kernel[(tokens, triton.cdiv(num_heads, block_h))](
        x, cos, signed_sin, out, num_heads, x.stride(0), x.stride(1), cos.stride(0), signed_sin.stride(0),
        dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4, **_LAUNCH,
    )
    return out


@triton.jit
def _rotate_write_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_q_heads, num_kv_heads,
    stride_t, stride_ct, stride_st, stride_kc_slot, stride_vc_slot, dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, NUM_QK_BLOCKS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    slot = tl.load(slot_ptr + token)
    # the token's cache row (< 0: a padding row, written nowhere): in a contiguous cache the rows of a block
    # follow each other, so block * block_size + offset = slot rows from the start
    if head_block >= NUM_QK_BLOCKS:  # value heads: copied into the cache as they are
        heads = (head_block - NUM_QK_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < num_kv_heads) & col_mask[None, :]
        v = tl.load(qkv_ptr + token * stride_t + (num_q_heads + num_kv_heads + heads[:, None]) * dim
                    + cols[None, :], mask=mask, other=0.0)
        if slot >= 0:
            tl.store(v_cache_ptr + slot * stride_vc_slot + heads[:, None] * dim + cols[None, :], v, mask=mask)
        return
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < num_q_heads + num_kv_heads) & col_mask[None, :]
    row = qkv_ptr + token * stride_t + heads[:, None] * dim
    dtype = out_ptr.dtype.element_ty
    y = _rotated(row, cos_ptr + token * stride_ct, sin_ptr + token * stride_st, cols, mask, dim, dtype)
    y = y.to(dtype)
    tl.store(out_ptr + token * (num_q_heads + num_kv_heads) * dim + heads[:, None] * dim + cols[None, :], y,
             mask=mask)
    is_key = (heads[:, None] >= num_q_heads) & mask
    if slot >= 0:
        key_heads = heads[:, None] - num_q_heads
        tl.store(k_cache_ptr + slot * stride_kc_slot + key_heads * dim + cols[None, :], y, mask=is_key)


def rotate_and_write_kv(
    qkv: torch.Tensor,
    num_q_heads: int,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor | None:
    """From a fused projection's output qkv [N, (H + 2 Hkv) * D]: q and k heads rotated as `rotate` rotates
    them, into a new [N, H + Hkv, D]; k (rotated) and v written into the caches [blocks, block_size, Hkv, D]
    at `slot_mapping` (< 0: nowhere), as the attention backend's write_kv writes them. One launch for what
    takes two. None for any other layout or dtype."""
    tokens = qkv.shape[0]
    num_kv_heads, dim = k_cache.shape[2], k_cache.shape[3]
    num_qk = num_q_heads + num_kv_heads
    if (
        qkv.dim() != 2
        or qkv.stride(1) != 1
        or qkv.shape[1] != (num_qk + num_kv_heads) * dim
        or dim % 2
        or dim > _MAX_DIM
        or not qkv.dtype == cos.dtype == signed_sin.dtype == k_cache.dtype == v_cache.dtype
        or any(t.shape != (tokens, 1, dim) or t.stride(-1) != 1 for t in (cos, signed_sin))
        or not all(c.is_contiguous() for c in (k_cache, v_cache))
    ):
        return None
    out = torch.empty(tokens, num_qk, dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return out
    block_d = triton.next_power_of_2(dim)
    block_h = max(1, min(triton.next_power_of_2(num_qk), 2048 // block_d))
    num_qk_blocks = triton.cdiv(num_qk, block_h)
    grid = (tokens, num_qk_blocks + triton.cdiv(num_kv_heads, block_h))
    _rotate_write_kv_kernel[grid](
        qkv, cos, signed_sin, out, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads, qkv.stride(0),
        cos.stride(0), signed_sin.stride(0), k_cache.stride(1), v_cache.stride(1), dim,
        BLOCK_H=block_h, BLOCK_D=block_d, NUM_QK_BLOCKS=num_qk_blocks, num_warps=4, **_LAUNCH,
    )
    return out
