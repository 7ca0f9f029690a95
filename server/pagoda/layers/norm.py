"""RMSNorm, in the two numeric flavours of the Hugging Face models it must match bit for bit, and with the
residual add before it folded in (vLLM's fused_add_rms_norm): a layer carries the residual stream beside its
output and normalises their sum, which it keeps as the next residual."""

from __future__ import annotations

from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.layers import cpu_ops

# the dtypes the C++ operator computes as this module's torch path does, bit for bit
_CPU_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RMSNorm(nn.Module):
    """Normalise in float32; Llama scales by w after casting back, Gemma by (1 + w) before casting back.

    With a residual, returns (norm(x + residual), x + residual), the sum rounded to x's dtype first, as
    `hidden = hidden + x` does in transformers' layers."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._cpu_op(x):  # the add and the norm in one call instead of ~8 eager ops
            out, total = torch.ops.pagoda.add_rms_norm(x, residual, self.weight, self.eps, self.unit_offset)
            return out if residual is None else (out, total)
        if residual is None:
            return self._norm(x)
        if x.is_cuda:  # one Triton launch instead of the add and the norm's
            from pagoda.layers import triton_ops

            fused = triton_ops.add_rms_norm(x, residual, self.weight, self.eps, self.unit_offset)
            if fused is not None:
                return fused
        total = x + residual
        return self._norm(total), total

    def add_norm_(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(x, residual), in place where one C++ call can (on the CPU: x becomes the norm, residual
        the sum, no allocation): for a caller whose x and residual are its own scratch and that uses only
        what this returns (the decoder's residual stream)."""
        if self._cpu_op(x):
            torch.ops.pagoda.add_rms_norm_(x, residual, self.weight, self.eps, self.unit_offset)
            return x, residual
        return self.forward(x, residual)

    def _cpu_op(self, x: torch.Tensor) -> bool:
        return (
            x.is_cpu  # (a property: x.device builds a device object, 61 calls a step)
            and x.dim() == 2
            and x.dtype == self.weight.dtype
            and x.dtype in _CPU_OP_DTYPES
            and cpu_ops.available()
        )

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
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
