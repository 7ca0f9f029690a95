"""Random weights in place of a checkpoint's (`load_format="dummy"`, as vLLM's): for benchmarking a model
whose weights are not at hand. They are drawn where the parameters live, so an 8B model on a GPU costs no
host memory and no copy."""

from __future__ import annotations

import torch
from torch import nn

# vLLM's range: activations stay small through any depth, so no dtype overflows
_LOW, _HIGH = -1e-3, 1e-3


def fill_random_weights(model: nn.Module) -> None:
    """Every parameter uniform in [-1e-3, 1e-3], from the global generator (the engine seeds it)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                raise ValueError(
                    f"random weights need floating-point parameters, but {name} is {param.dtype} "
                    "(a quantized checkpoint format)"
                )
            param.uniform_(_LOW, _HIGH)
