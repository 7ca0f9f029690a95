"""Linear layers whose parameters know how to load checkpoint tensors into themselves.

Every parameter carries a `weight_loader(param, tensor, shard=None)`. Fused projections (q/k/v into one
qkv_proj, gate/up into one gate_up_proj) take each checkpoint tensor as one shard of the fused output;
a checkpoint that already stores the fused tensor (Phi-3) loads it whole with shard=None.

Tensor parallelism (Megatron-style): a column-parallel layer keeps its rank's slice of the output
features and needs no communication; a row-parallel layer keeps the matching slice of the input features
and all-reduces its partial sums. Loaders cut each rank's slice out of the full checkpoint tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.distributed.parallel_state import all_reduce, get_tp_rank, get_tp_size
from pagoda.quantization import get_linear_method


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard: int | None = None) -> None:
    if shard is not None:
        raise ValueError("this parameter is not fused: it takes no shard")
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        # the quant method (full precision, int8, fp8, GGUF blocks) owns the weight: its storage, its
        # loading and the product; the layer keeps the bias and the tensor-parallel slicing
        self.quant_method = get_linear_method()
        self.quant_method.create_weights(self, input_size, output_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        default_weight_loader(param, loaded, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


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


def divide(size: int, tp_size: int, what: str) -> int:
    if size % tp_size:
        raise ValueError(f"{what} ({size}) is not divisible by tensor_parallel_size {tp_size}")
    return size // tp_size


class MergedColumnParallelLinear(MergedLinear):
    """A MergedLinear whose every part is split along its outputs: each rank computes its slice of each."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(input_size, [divide(s, self.tp_size, "output size") for s in output_sizes], bias)
        self.full_output_sizes = list(output_sizes)

    def shard_offset(self, shard: int) -> int:
        """First row of this rank's slice of part `shard`, in that part's checkpoint tensor."""
        return self.tp_rank * self.output_sizes[shard]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        if shard is None:
            # the checkpoint stores the fused tensor (Phi-3): cut each part's slice out of it
            for part, tensor in enumerate(loaded.split(self.full_output_sizes)):
                self.weight_loader(param, tensor, part)
            return
        rows = loaded.narrow(0, self.shard_offset(shard), self.output_sizes[shard])
        super().weight_loader(param, rows, shard)


class QKVParallelLinear(MergedColumnParallelLinear):
    """The fused q/k/v projection, split by attention heads: each rank keeps num_heads / N query heads and
    the KV heads they attend to. With fewer KV heads than ranks, ranks share (replicate) a KV head."""

    def __init__(
        self, input_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        tp_size = get_tp_size()
        if num_kv_heads < tp_size and tp_size % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {tp_size} is neither a divisor nor a multiple of the "
                f"{num_kv_heads} KV heads"
            )
        self.head_dim, self.total_kv_heads = head_dim, num_kv_heads
        self.num_kv_heads = max(1, num_kv_heads // tp_size)  # per rank
        kv_size = self.num_kv_heads * head_dim * tp_size  # what divides into this rank's KV slice
        super().__init__(input_size, [num_heads * head_dim, kv_size, kv_size], bias)
        self.full_output_sizes[1:] = [num_kv_heads * head_dim] * 2

    def shard_offset(self, shard: int) -> int:
        if shard == 0:
            return super().shard_offset(shard)
        # rank r's query heads start at head r*H/N, which attends to KV head r*Hkv/N (rounded down)
        return self.tp_rank * self.total_kv_heads // self.tp_size * self.head_dim


class RowParallelLinear(Linear):
    """Split along the inputs: each rank multiplies its slice of them, and an all-reduce sums the parts."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size_per_rank = divide(input_size, self.tp_size, "input size")
        super().__init__(self.input_size_per_rank, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        if param is self.bias:
            # the bias must be added once: rank 0 holds it, the others a zero bias
            loaded = loaded if self.tp_rank == 0 else torch.zeros_like(loaded)
        else:
            width = self.input_size_per_rank
            loaded = loaded.narrow(1, self.tp_rank * width, width)
        super().weight_loader(param, loaded, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return all_reduce(out) if self.tp_size > 1 else out
