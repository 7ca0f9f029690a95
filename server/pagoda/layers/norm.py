"""RMSNorm, in the two numeric flavours of the Hugging Face models it must match bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Normalise in float32; Llama scales by w after casting back, Gemma by (1 + w) before casting back."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one Triton launch instead of four kernels: the same roundings, its own summing order
            from pagoda.layers import triton_ops

            if (out := triton_ops.rms_norm(x, self.weight, self.eps, self.unit_offset)) is not None:
                return out
        if self.unit_offset:
            normed = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        if x.device.type == "cpu" and x.dtype == self.weight.dtype:
            # one op where it computes the same floats (61 norms a step, ~5 us a cast): F.rms_norm upcasts
            # half input to float32, normalises and rounds back, as transformers' casts around it do, and
            # scales by w last; in half precision that product must round the normalised x first
            if x.dtype == torch.float32:
                return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
            return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)
        # F.rms_norm on float32 input: x * rsqrt(mean(x^2) + eps), the same float ops as transformers'
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
