"""Mixture-of-experts layers shared by every sparse family (Mixtral, Qwen2/3-MoE, gpt-oss).

A router scores each token against every expert and keeps the top k (`select_experts`). The experts'
weights are stacked, `w13` [E, 2 * I, H] (gate rows, then up rows) and `w2` [E, H, I], so each expert is
one slice. Once per layer the (token, expert) pairs are sorted by expert (`ExpertGroups`): every expert
then multiplies one contiguous run of rows, in one matmul, and the weighted results are summed back into
their tokens with one index_add. On the CPU that is a loop over the experts that got tokens; on a GPU one
Triton grouped GEMM covers all of them (`pagoda.layers.fused_moe_triton`).

Quantization: under `int8` / `fp8` each expert's two weights are quantized after loading, as a dense
linear layer's are (per output channel, after the tensor-parallel slicing), and multiplied with the same
kernels, expert by expert; the router stays in full precision. Under `gguf` the file's stacked expert
tensors keep their blocks (no float copy is ever made), each expert's gate and up stacked into one weight.

Tensor parallelism: every rank holds a slice of every expert's intermediate dimension (gate/up rows,
down columns), as in the dense MLP. That needs no all-to-all dispatch, keeps the ranks' work equal
whatever the routing, and works for any number of experts; the partial sums are all-reduced once per
layer by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.distributed.parallel_state import get_tp_rank, get_tp_size
from pagoda.layers.activation import ACTIVATIONS
from pagoda.layers.linear import default_weight_loader, divide
from pagoda.loader.checkpoint import QuantizedBlocks
from pagoda.loader.dequant import dequantize
from pagoda.quantization import get_linear_method
from pagoda.quantization.gguf_blocks import group_quantized_from_blocks, is_supported
from pagoda.quantization.grouped import GroupQuantized, stack_rows
from pagoda.quantization.methods import GGUFLinearMethod, QuantizedWeight, pack_for_device

GATE, UP, DOWN = 0, 1, 2  # the parts of one expert, as the shards of its checkpoint tensors
ExpertShard = tuple[int, int]  # (expert, part)


@dataclass(frozen=True)
class Routing:
    """How a family's router turns logits into top-k experts and their weights."""

    top_k: int
    # "softmax": softmax over every expert, then the top k (Mixtral, Qwen, DeepSeek V2); "topk_softmax":
    # the top k logits, then a softmax over them (gpt-oss); "sigmoid": independent sigmoids (DeepSeek V3)
    scoring: str = "softmax"
    renormalize: bool = True  # the top-k weights divided by their sum
    # DeepSeek: experts come in groups and only the topk_groups best groups are eligible. A group scores
    # its best expert (V2) or the sum of its best two, correction bias included (V3's sigmoid scoring).
    num_groups: int = 1
    topk_groups: int = 1
    scale: float = 1.0  # DeepSeek's routed_scaling_factor

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "topk_softmax", "sigmoid"):
            raise ValueError(f"unsupported expert scoring {self.scoring!r}")


def select_experts(
    logits: torch.Tensor, routing: Routing, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, k] float32, expert ids [N, k] int64), as transformers routes.
    `correction_bias` (DeepSeek V3) shifts which experts are chosen, not their weights."""
    if routing.scoring == "topk_softmax":  # the same weights as renormalising, computed in this order
        values, ids = logits.topk(routing.top_k, dim=-1)
        return values.softmax(dim=-1).float(), ids
    if routing.scoring == "sigmoid":
        scores = logits.float().sigmoid()
    else:
        scores = logits.softmax(dim=-1, dtype=torch.float32)
    choice = scores if correction_bias is None else scores + correction_bias
    if routing.num_groups > 1:
        choice = _best_groups_only(choice, routing)
    weights, ids = choice.topk(routing.top_k, dim=-1)
    if choice is not scores:
        weights = scores.gather(1, ids)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routing.scale if routing.scale != 1.0 else weights, ids


def _best_groups_only(choice: torch.Tensor, routing: Routing) -> torch.Tensor:
    grouped = choice.view(choice.shape[0], routing.num_groups, -1)
    if routing.scoring == "sigmoid":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = group_scores.topk(routing.topk_groups, dim=-1)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


@dataclass
class ExpertGroups:
    """The step's (token, expert) pairs sorted by expert: row r of the sorted batch is token `tokens[r]`
    going to its expert with weight `weights[r]`; expert e owns rows [starts[e], starts[e] + counts[e])."""

    tokens: torch.Tensor  # [N * k] int64
    weights: torch.Tensor  # [N * k] float32
    counts: list[int]  # [E], on the host: the only synchronisation of the layer
    order: torch.Tensor  # [N * k]: sorted row -> flat (token, slot) index

    @classmethod
    def from_routing(cls, weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> ExpertGroups:
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)  # stable: each expert's tokens stay in batch order
        counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
        return cls(order // ids.shape[1], weights.flatten()[order], counts, order)

    def runs(self) -> list[tuple[int, slice]]:
        """(expert, its rows) for every expert that got tokens."""
        out, start = [], 0
        for expert, count in enumerate(self.counts):
            if count:
                out.append((expert, slice(start, start + count)))
            start += count
        return out


class ReplicatedLinear(nn.Module):
    """A small full-precision projection every rank holds whole: the router, Qwen2-MoE's shared gate.
    Never quantized: routing decisions are sensitive to rounding, and the weight is tiny."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Router(ReplicatedLinear):
    """Token -> expert logits; DeepSeek V3's also carries the bias that corrects which experts win."""

    def __init__(self, hidden_size: int, num_experts: int, bias: bool = False, correction_bias: bool = False):
        super().__init__(hidden_size, num_experts, bias)
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias
            else None
        )


class FusedMoE(nn.Module):
    """The routed experts of one layer: x [N, H], routing weights/ids [N, k] -> this rank's partial sum
    [N, H]."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        activation: str = "silu",
        bias: bool = False,
        swiglu_limit: float | None = None,
        swiglu_alpha: float = 1.702,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_experts = num_experts
        self.intermediate = divide(intermediate_size, self.tp_size, "expert intermediate size")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        method = get_linear_method()  # the model's --quantization, as its Linear layers get it
        self.quantize = method.quantize_weight
        self.quantized: list[tuple[QuantizedWeight, QuantizedWeight]] | None = None  # (w13, w2) by expert
        # GGUF: each expert's parts as the file holds them, until loading ends; the weights are placeholders
        self.file_parts: dict[ExpertShard, GroupQuantized | torch.Tensor] | None = (
            {} if isinstance(method, GGUFLinearMethod) else None
        )
        self.hidden_size, self.params_dtype = hidden_size, torch.get_default_dtype()
        shape13: tuple[int, ...] = (num_experts, 2 * self.intermediate, hidden_size)
        shape2: tuple[int, ...] = (num_experts, hidden_size, self.intermediate)
        if self.file_parts is not None:
            shape13, shape2 = (0,), (0,)
        self.w13 = self._param(*shape13, shards=2 * num_experts)
        self.w2 = self._param(*shape2, shards=num_experts)
        self.w13_bias, self.w2_bias = None, None
        if bias:
            self.w13_bias = self._param(num_experts, 2 * self.intermediate, shards=2 * num_experts)
            self.w2_bias = self._param(num_experts, hidden_size, shards=num_experts)

    def _param(self, *shape: int, shards: int) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape), requires_grad=False)
        param.num_shards = shards  # one per expert and part: load_weights checks every one arrived
        param.weight_loader = self.weight_loader
        return param

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: ExpertShard | None = None
    ) -> None:
        """Load one expert's gate, up or down weight (or bias), as the checkpoint stores it: gate/up
        [I, H] (bias [I]), down [H, I] (bias [H]). This rank keeps its slice of I."""
        if shard is None:
            raise ValueError("expert weights load one expert and part at a time")
        expert, part = shard
        width = self.intermediate
        if self.file_parts is not None and (param is self.w13 or param is self.w2):
            self.file_parts[shard] = self._file_part(loaded, part)
            return
        if part == DOWN:
            if param is self.w2_bias:  # added once: rank 0 holds it, the others zeros
                rows = loaded if self.tp_rank == 0 else torch.zeros_like(loaded)
            else:
                rows = loaded.narrow(1, self.tp_rank * width, width)
            default_weight_loader(param.data[expert], rows)
            return
        rows = loaded.narrow(0, self.tp_rank * width, width)
        default_weight_loader(param.data[expert].narrow(0, part * width, width), rows)

    def _file_part(self, loaded: torch.Tensor | QuantizedBlocks, part: int) -> GroupQuantized | torch.Tensor:
        expected = (self.intermediate, self.hidden_size)
        if part == DOWN:
            expected = (self.hidden_size, self.intermediate)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"shape mismatch: expert weight {expected}, checkpoint {tuple(loaded.shape)}")
        if not isinstance(loaded, QuantizedBlocks):
            return loaded
        if is_supported(loaded.ggml_type):
            return group_quantized_from_blocks(loaded)
        return dequantize(loaded.data.contiguous().view(-1), loaded.ggml_type, loaded.shape)

    def process_weights_after_loading(self) -> None:
        """Quantize every expert's weights, one expert at a time, once they are loaded."""
        if self.file_parts is not None:
            self._take_file_parts()
            return
        w13s = [self.quantize(self.w13.data[e]) for e in range(self.num_experts)]
        w2s = [self.quantize(self.w2.data[e]) for e in range(self.num_experts)]
        if any(w is None for w in w13s + w2s):  # this format keeps the experts in float
            return
        self.quantized = [
            (w13, w2) for w13, w2 in zip(w13s, w2s, strict=True) if w13 is not None and w2 is not None
        ]
        self.register_parameter("w13", None)
        self.register_parameter("w2", None)

    def _take_file_parts(self) -> None:
        """GGUF: each expert's weights in the kernels' form, or all in float when the file stores floats."""
        parts, self.file_parts = self.file_parts or {}, None
        device = self.w13.device

        def weight(*shards: ExpertShard) -> GroupQuantized | torch.Tensor:
            pieces = [parts[s] for s in shards]
            if all(isinstance(p, GroupQuantized) for p in pieces):
                return stack_rows(pieces)
            full = [p.dequantize() if isinstance(p, GroupQuantized) else p for p in pieces]
            return torch.cat(full).to(device=device, dtype=self.params_dtype)

        experts = [(weight((e, GATE), (e, UP)), weight((e, DOWN))) for e in range(self.num_experts)]
        if not any(isinstance(w, GroupQuantized) for pair in experts for w in pair):
            self.w13 = nn.Parameter(torch.stack([w13 for w13, _ in experts]), requires_grad=False)
            self.w2 = nn.Parameter(torch.stack([w2 for _, w2 in experts]), requires_grad=False)
            return
        packed = [tuple(_kernel_form(w, device) for w in pair) for pair in experts]
        self.quantized = packed  # type: ignore[assignment]
        self.register_parameter("w13", None)
        self.register_parameter("w2", None)

    def quantized_tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.quantized or [] for w in pair for t in w.tensors()]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        groups = ExpertGroups.from_routing(weights, ids, self.num_experts)
        if x.is_cuda and self.quantized is None:
            from pagoda.layers.fused_moe_triton import fused_experts  # triton only where it runs

            expert_out = fused_experts(x, self, groups)
        else:
            expert_out = self.experts_torch(x, groups)
        # back to (token, slot) order, then each token's k weighted outputs summed: a copy and a sum,
        # several times faster on the CPU than scatter-adding the sorted rows into the tokens
        weighted = torch.empty(expert_out.shape, dtype=torch.float32, device=x.device)
        weighted.index_copy_(0, groups.order, expert_out.float() * groups.weights[:, None])
        return weighted.view(x.shape[0], -1, x.shape[1]).sum(dim=1).to(x.dtype)

    def experts_torch(self, x: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        """Each expert's output for its sorted rows [N * k, H], unweighted: one matmul pair per expert."""
        rows = x[groups.tokens]
        out = torch.empty_like(rows)
        for expert, run in groups.runs():
            b13 = None if self.w13_bias is None else self.w13_bias[expert]
            b2 = None if self.w2_bias is None else self.w2_bias[expert]
            if self.quantized is None:
                hidden = self.activate(F.linear(rows[run], self.w13[expert], b13))
                out[run] = F.linear(hidden, self.w2[expert], b2)
                continue
            w13, w2 = self.quantized[expert]
            hidden = self.activate(_plus(w13.matmul(rows[run]), b13))
            out[run] = _plus(w2.matmul(hidden), b2)
        return out

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[M, 2 * I] = [gate | up] -> [M, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        if self.swiglu_limit is None:
            return self.act(gate) * up
        # gpt-oss: gate clamped from above, up on both sides, and a +1 on up
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.swiglu_alpha))


def _plus(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x if bias is None else x + bias


class _FloatWeight:
    """A float weight beside quantized ones (a GGUF expert whose down projection is stored in float)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]


def _kernel_form(weight: GroupQuantized | torch.Tensor, device: torch.device) -> QuantizedWeight:
    return pack_for_device(weight, device) if isinstance(weight, GroupQuantized) else _FloatWeight(weight)
