"""Group-wise affine integer weights: the one form every quantized format here reduces to.

    w[n, k] = scale[n, k // G] * q[n, k] + offset[n, k // G]

int8 per-channel is G = K without offsets; GGUF's Q8_0/Q4_0/Q4_1/Q4_K/Q5_x are G = 32 and Q6_K G = 16,
with the block's minimum as the offset where the format has one. The kernels (torch's packed CPU
kernels, the Triton dequant-matmul) each repack this form once, after loading; `dequantize` is the
reference they are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupQuantized:
    q: torch.Tensor  # int8 [N, K]: 0..15 when bits == 4, any int8 when bits == 8
    scale: torch.Tensor  # float32 [N, K // G]
    offset: torch.Tensor | None  # float32 [N, K // G], or None for symmetric formats
    bits: int  # 4 or 8: the range q takes, which decides how densely the kernels can pack it

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        n, k = self.q.shape
        if self.scale.shape[0] != n or k % self.scale.shape[1]:
            raise ValueError(f"scales {tuple(self.scale.shape)} do not tile weights {tuple(self.q.shape)}")
        if self.offset is not None and self.offset.shape != self.scale.shape:
            raise ValueError("offsets must have the scales' shape")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] these integers stand for."""
        n, k = self.q.shape
        groups = self.q.view(n, -1, self.group_size).float() * self.scale[..., None]
        if self.offset is not None:
            groups = groups + self.offset[..., None]
        return groups.view(n, k).to(dtype)

    def with_group_size(self, group_size: int) -> GroupQuantized:
        """The same weight, described by smaller groups (each scale repeated), so formats can stack."""
        if group_size == self.group_size:
            return self
        if self.group_size % group_size:
            raise ValueError(f"group size {self.group_size} is not a multiple of {group_size}")
        repeat = self.group_size // group_size
        offset = None if self.offset is None else self.offset.repeat_interleave(repeat, dim=1)
        return GroupQuantized(self.q, self.scale.repeat_interleave(repeat, dim=1), offset, self.bits)


def quantize_per_channel_int8(weight: torch.Tensor) -> GroupQuantized:
    """Symmetric int8 with one scale per output row (W8A16): scale = max|w| / 127, q = round(w / scale)."""
    return quantize_int8(weight, group_size=weight.shape[1])


def quantize_int8(weight: torch.Tensor, group_size: int, float16_scales: bool = False) -> GroupQuantized:
    """Symmetric int8 with one scale per `group_size` inputs of a row. `float16_scales`: GGUF's Q8_0 for
    groups of 32, exactly as llama.cpp quantizes (values times the float32 scale's reciprocal, rounded
    half away from zero; the scale stored as float16), where the scales fit float16."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    scale = w.abs().amax(dim=2, keepdim=True) / 127.0
    if float16_scales and scale.max() <= torch.finfo(torch.float16).max:
        x = w * torch.where(scale > 0, 1.0 / scale, 0.0)
        q = (x.sign() * (x.abs() + 0.5).floor()).to(torch.int8)
        return GroupQuantized(q.view(n, k), scale[..., 0].half().float(), None, bits=8)
    scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return GroupQuantized(q.view(n, k), scale[..., 0], None, bits=8)


def stack_rows(parts: list[GroupQuantized]) -> GroupQuantized:
    """Parts of a fused projection (q/k/v, gate/up), possibly of different formats, as one weight."""
    if len(parts) == 1:
        return parts[0]
    group_size = min(p.group_size for p in parts)
    parts = [p.with_group_size(group_size) for p in parts]
    offsets = None
    if any(p.offset is not None for p in parts):
        offsets = torch.cat([torch.zeros_like(p.scale) if p.offset is None else p.offset for p in parts])
    return GroupQuantized(
        torch.cat([p.q for p in parts]),
        torch.cat([p.scale for p in parts]),
        offsets,
        bits=max(p.bits for p in parts),
    )
