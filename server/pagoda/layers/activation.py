"""Gated activations for the fused gate/up projection: act(gate) * up."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
