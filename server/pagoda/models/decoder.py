"""The decoder shared by every architecture: Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3, and the
mixtures of experts Mixtral, Qwen2/3-MoE, gpt-oss and DeepSeek V2/V3, whose sparse layers swap the MLP
for `SparseMoeBlock` (and DeepSeek's attention for `MultiLatentAttention`).

They differ only by flags of the ModelSpec (biases, q/k norms, Gemma's norm flavour and sandwich norms,
embedding scale, soft-caps, per-layer sliding windows and RoPE). Module names mirror the Hugging Face
checkpoints, except that q/k/v are fused into `qkv_proj` and gate/up into `gate_up_proj` at load time.
Under tensor parallelism each rank builds the same modules with its share of the heads and MLP features;
the layers cut their slices out of the checkpoint tensors as they load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pagoda.distributed.parallel_state import all_reduce, get_tp_rank, get_tp_size
from pagoda.layers.activation import GatedActivation
from pagoda.layers.attention import Attention
from pagoda.layers.embedding import ParallelLMHead, VocabEmbedding
from pagoda.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from pagoda.layers.moe import FusedMoE, ReplicatedLinear, Router, select_experts
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RopeConfig, RotaryEmbedding
from pagoda.models.mla import MultiLatentAttention
from pagoda.models.moe_weights import expert_shards, normalize_expert_names
from pagoda.models.spec import ModelSpec


class DecoderAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, bias=spec.qkv_bias
        )
        # this rank's share of the heads
        self.num_heads = spec.num_heads // self.qkv_proj.tp_size
        self.num_kv_heads, self.head_dim = self.qkv_proj.num_kv_heads, spec.head_dim
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=spec.o_bias)
        self.qk_norm, self.has_sinks = spec.qk_norm, spec.attention_sinks
        # q, k and v straight out of the projection, attended without sinks: what the fused op takes
        self.plain_heads = not (spec.qk_norm or spec.attention_sinks)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.norm_unit_offset)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, spec.norm_unit_offset)
        if spec.attention_sinks:
            self.tp_rank = get_tp_rank()  # now: the weights load outside the sharding context
            self.sinks = nn.Parameter(torch.empty(self.num_heads), requires_grad=False)
            self.sinks.weight_loader = self._load_sinks
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            spec.head_dim,
            spec.attention_scale,
            sliding_window=spec.sliding_windows[layer],
            softcap=spec.attn_logit_softcap,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # (submodules' forward, not __call__, on the decoder's hot path: no hooks, ~1 us less a call)
        qkv = self.qkv_proj.forward(hidden)
        if self.plain_heads:  # rotary, cache writes and attention fused where a kernel serves the step
            out = self.attn.rope_attention(qkv, self.rotary_emb, positions)
            if out is not None:
                return self.o_proj.forward(out)
        heads = [self.num_heads, self.num_kv_heads]
        qk_width = sum(heads) * self.head_dim
        if self.qk_norm:  # Qwen3 normalises each head before the rotation
            q, k, _ = self.qkv_proj.split(qkv)
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim))
            qk = torch.cat((q, k), dim=1)
        else:  # q and k sit side by side in the fused output: one view holds both
            qk = qkv[:, :qk_width].view(-1, sum(heads), self.head_dim)
        # both rotated in one go, in place: qk is this layer's own (the projection's output or the cat)
        q, k = self.rotary_emb.rotate_(positions, qk).split(heads, dim=1)
        # (plain attributes, not hasattr on the module: a missing one costs an exception each layer)
        out = self.attn.forward(q, k, qkv[:, qk_width:], self.sinks if self.has_sinks else None)
        return self.o_proj.forward(out)

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        # one per query head: this rank's heads
        default_weight_loader(param, loaded.narrow(0, self.tp_rank * self.num_heads, self.num_heads), shard)


class DecoderMLP(nn.Module):
    def __init__(self, spec: ModelSpec, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = intermediate_size or spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            spec.hidden_size, [intermediate_size] * 2, bias=spec.mlp_bias
        )
        self.act_fn = GatedActivation(spec.hidden_act)
        self.down_proj = RowParallelLinear(intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward(self.act_fn.forward(self.gate_up_proj.forward(x)))


class SparseMoeBlock(nn.Module):
    """The MLP of a sparse layer: the router's top-k experts per token, plus the shared expert of
    Qwen2-MoE (gated) and DeepSeek. Module names follow the checkpoints (`gate` is the router)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        moe = spec.moe
        assert moe is not None
        self.moe = moe
        self.gate = Router(spec.hidden_size, moe.num_experts, moe.bias, moe.correction_bias)
        self.experts = FusedMoE(
            moe.num_experts,
            spec.hidden_size,
            moe.intermediate_size,
            spec.hidden_act,
            bias=moe.bias,
            swiglu_limit=moe.swiglu_limit,
            swiglu_alpha=moe.swiglu_alpha,
        )
        if moe.shared_intermediate_size:
            self.shared_expert = DecoderMLP(spec, moe.shared_intermediate_size)
        if moe.shared_expert_gate:
            self.shared_expert_gate = ReplicatedLinear(spec.hidden_size, 1)
        self.tp_size = get_tp_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.moe.routing, self.gate.e_score_correction_bias)
        out = self.experts(x, weights, ids)
        if self.tp_size > 1:
            out = all_reduce(out)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn: nn.Module = (
            MultiLatentAttention(spec, rotary_emb) if spec.mla else DecoderAttention(spec, layer, rotary_emb)
        )
        sparse = spec.moe is not None and spec.moe.sparse_layers[layer]
        self.mlp = SparseMoeBlock(spec) if sparse else DecoderMLP(spec)
        eps, offset = spec.rms_norm_eps, spec.norm_unit_offset
        self.input_layernorm = RMSNorm(spec.hidden_size, eps, offset)
        # Llama: the norm before the MLP. Gemma 2/3: the norm of the attention output (a "sandwich").
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps, offset)
        self.sandwich_norms = spec.sandwich_norms
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(spec.hidden_size, eps, offset)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream travels beside the layer's output (None entering the first layer): each norm
        that follows a residual add takes both and returns (norm of the sum, the sum), one op on the CPU."""
        # (the norms add in place: the residual stream and each block's output are this forward's own)
        if residual is None:
            residual, hidden = hidden, self.input_layernorm.forward(hidden)
        else:
            hidden, residual = self.input_layernorm.add_norm_(hidden, residual)
        hidden = self.self_attn.forward(positions, hidden)
        if self.sandwich_norms:  # Gemma 2/3 normalise each block's output before adding it
            attended = self.post_attention_layernorm.forward(hidden)
            hidden, residual = self.pre_feedforward_layernorm.add_norm_(attended, residual)
            return self.post_feedforward_layernorm.forward(self.mlp.forward(hidden)), residual
        hidden, residual = self.post_attention_layernorm.add_norm_(hidden, residual)
        return self.mlp.forward(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.hidden_size)
        # one rotary module per distinct RoPE configuration, shared by the layers that use it
        rotaries: dict[RopeConfig, RotaryEmbedding] = {}
        for rope in spec.ropes:
            rotaries.setdefault(rope, RotaryEmbedding(rope))
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, rotaries[rope]) for i, rope in enumerate(spec.ropes)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_unit_offset)
        self.embedding_scale = spec.embedding_scale

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:
            # rounded to the model's dtype first, exactly as transformers does
            hidden = hidden * torch.tensor(self.embedding_scale, dtype=torch.float32).to(hidden.dtype)
        residual = None
        for layer in self.layers:  # forward, not __call__: no hooks on the hot path
            hidden, residual = layer.forward(positions, hidden, residual)
        return self.norm.add_norm_(hidden, residual)[0]


class DecoderForCausalLM(nn.Module):
    # checkpoint module name -> (our fused module, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether a decode step can be captured: not when routing reads the experts' token counts back
        to the host (MoE), nor when attention runs on the torch backend, which plans on the host (sinks,
        MLA)."""
        return self.spec.moe is None and self.spec.mla is None and not self.spec.attention_sinks

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat batch of token ids [N] at their positions [N] -> final hidden states [N, hidden_size]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Hidden states [M, hidden_size] -> logits [M, vocab_size]; None on tensor-parallel ranks other than
        0, which only lend their vocabulary slices. In the head's dtype (its matmul's rounding), float32 where
        a soft-cap applies: every consumer casts to float32 (exact), except the greedy sampler's argmax, which
        reads them as they are (32 rows of 49k bfloat16 logits: 0.5-0.8 ms less a CPU step)."""
        logits = self.lm_head(hidden)
        if logits is None:
            return None
        cap = self.spec.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits.float() / cap)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face checkpoint tensors; every parameter must end up loaded, in full."""
        params = dict(self.named_parameters())
        loaded: dict[str, set[object]] = {}
        for name, tensor in normalize_expert_names(weights):
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some checkpoints save; we compute it
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue  # the embedding doubles as the head
            # a name the model has as is (DeepSeek's unfused q_proj) is not a part of a fused projection
            plain = [(name, None, tensor)] if name in params else [(*self._param_name(name), tensor)]
            for target, shard, part in expert_shards(name, tensor) or plain:
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} matches no parameter of this model")
                param = params[target]
                weight_loader: Callable[..., None] = getattr(param, "weight_loader", default_weight_loader)
                weight_loader(param, part, shard)
                loaded.setdefault(target, set()).add(shard)
        incomplete = [
            name for name, param in params.items() if not _fully_loaded(param, loaded.get(name, set()))
        ]
        if incomplete:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(incomplete)}")

    def _param_name(self, name: str) -> tuple[str, int | None]:
        parts = name.split(".")
        # the module name is the component before weight/bias; match it whole ("qkv_proj" holds "v_proj")
        if len(parts) >= 2 and parts[-2] in self.packed_modules:
            fused, shard = self.packed_modules[parts[-2]]
            return ".".join([*parts[:-2], fused, parts[-1]]), shard
        return name, None


def _fully_loaded(param: nn.Parameter, shards: set[object]) -> bool:
    return None in shards or len(shards) == getattr(param, "num_shards", 1)
