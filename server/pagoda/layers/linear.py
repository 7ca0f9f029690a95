"""Linear layers whose parameters know how to load checkpoint tensors into themselves.

Every parameter carries a `weight_loader(param, tensor, shard=None)`. Fused projections (q/k/v into one
qkv_proj, gate/up into one gate_up_proj) take each checkpoint tensor as one shard of the fused output;
a checkpoint that already stores the fused tensor (Phi-3) loads it whole with shard=None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard: int | None = None) -> None:
    if shard is not None:
        raise ValueError("this parameter is not fused: it takes no shard")
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        default_weight_loader(param, loaded, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension, in one matmul."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes
        self.weight.num_shards = len(output_sizes)
        if self.bias is not None:
            self.bias.num_shards = len(output_sizes)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        if shard is None:
            default_weight_loader(param, loaded)
            return
        offset = sum(self.output_sizes[:shard])
        default_weight_loader(param.data.narrow(0, offset, self.output_sizes[shard]), loaded)

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return fused.split(self.output_sizes, dim=-1)
