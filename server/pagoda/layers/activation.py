"""Gated activations for the fused gate/up projection: act(gate) * up."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.layers import cpu_ops

# Hugging Face activation names (config.hidden_act / hidden_activation) -> functions
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
}


class GatedActivation(nn.Module):
    """Input [N, 2 * I] = [gate | up], output [N, I]."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[name]
        self.is_silu = self.act is F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.is_silu:  # one Triton launch instead of two kernels, the same numbers
            from pagoda.layers import triton_ops

            if (out := triton_ops.silu_and_mul(x)) is not None:
                return out
        elif self.is_silu and x.dtype == torch.bfloat16 and x.dim() == 2 and cpu_ops.available():
            # one C++ call instead of chunk, silu and mul, the same floats (torch's own exp included)
            return torch.ops.pagoda.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
