"""ModelSpec: one normalised, validated description of a decoder model, read from its Hugging Face config.

The model runner sizes the KV cache from it (layers, KV heads, head size, context length, sliding
windows); the shared decoder builds its layers from the rest (biases, norms, scalings, soft-caps).
Reads transformers 5.x configs (`rope_parameters`, `layer_types`) and the older 4.x spellings
(`rope_theta`, `rope_scaling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagoda.layers.moe import Routing
from pagoda.layers.rotary import RopeConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GEMMA_FAMILY = ("gemma", "gemma2", "gemma3_text")
MOE_FAMILY = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2", "deepseek_v3")
MLA_FAMILY = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek's multi-head latent attention: a token's keys and values are expanded from one latent."""

    q_lora_rank: int | None  # None: a plain q_proj
    kv_lora_rank: int  # R, the latent the cache stores (beside the shared rope key)
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # the rope pairs are adjacent values, not the two halves
    scale: float  # of the attention logits, YaRN's mscale included


@dataclass(frozen=True)
class MoESpec:
    """The sparse MLP of a mixture-of-experts model: which layers have one, and how tokens are routed."""

    num_experts: int
    routing: Routing
    intermediate_size: int  # of each expert
    sparse_layers: tuple[bool, ...]  # per layer; the others keep the dense MLP (Qwen2-MoE's mlp_only_layers)
    shared_intermediate_size: int = 0  # Qwen2-MoE's / DeepSeek's shared experts: every token goes through
    shared_expert_gate: bool = False  # ... scaled by sigmoid(gate(x)) (Qwen2-MoE)
    correction_bias: bool = False  # DeepSeek V3: the router's e_score_correction_bias
    bias: bool = False  # gpt-oss: biased router and experts
    swiglu_limit: float | None = None  # gpt-oss: clamped SwiGLU, (up + 1) * gate * sigmoid(alpha * gate)
    swiglu_alpha: float = 1.702



@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int  # the context length the model was trained for
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    ropes: tuple[RopeConfig, ...]  # per layer (Gemma 3 uses another base on sliding layers)
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    attention_scale: float
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm of each query/key head before RoPE (Qwen3, Gemma 3)
    norm_unit_offset: bool = False  # Gemma norms scale by (1 + w)
    embedding_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma 2/3: norms before and after both attention and MLP
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    attention_sinks: bool = False  # gpt-oss: a learned per-head logit in every softmax's denominator
    moe: MoESpec | None = None
    mla: MLASpec | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if len(self.sliding_windows) != self.num_layers or len(self.ropes) != self.num_layers:
            raise ValueError("sliding_windows and ropes need one entry per layer")

    @classmethod
    def from_hf_config(cls, cfg: PretrainedConfig) -> ModelSpec:
        model_type = cfg.model_type
        num_layers = cfg.num_hidden_layers
        num_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        layer_types = _layer_types(cfg)
        gemma = model_type in GEMMA_FAMILY
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            sliding_windows=tuple(_sliding_window(cfg, t) for t in layer_types),
            ropes=tuple(_rope(cfg, t, head_dim) for t in layer_types),
            rms_norm_eps=cfg.rms_norm_eps,
            hidden_act=_hidden_act(cfg),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_scale=(getattr(cfg, "query_pre_attn_scalar", None) or head_dim) ** -0.5,
            # Qwen2 and Qwen2-MoE: q/k/v biased, o not
            qkv_bias=True if model_type in ("qwen2", "qwen2_moe") else attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            norm_unit_offset=gemma,
            embedding_scale=cfg.hidden_size**0.5 if gemma else None,
            sandwich_norms=model_type in ("gemma2", "gemma3_text"),
            attn_logit_softcap=_attn_logit_softcap(cfg),
            final_logit_softcap=getattr(cfg, "final_logit_softcapping", None),
            attention_sinks=model_type == "gpt_oss",
            moe=_moe(cfg) if model_type in MOE_FAMILY else None,
            mla=_mla(cfg) if model_type in MLA_FAMILY else None,
        )


def _mla(cfg: PretrainedConfig) -> MLASpec:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rope = _rope_parameters(cfg, "full_attention")
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        scale *= _yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2  # transformers' yarn_apply_mscale
    return MLASpec(
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        # V2 rotates adjacent pairs too (as complex numbers)
        rope_interleave=bool(getattr(cfg, "rope_interleave", True)),
        scale=scale,
    )


def _deepseek_moe(cfg: PretrainedConfig) -> MoESpec:
    v3 = cfg.model_type == "deepseek_v3"
    grouped = v3 or getattr(cfg, "topk_method", "greedy") == "group_limited_greedy"
    routing = Routing(
        cfg.num_experts_per_tok,
        "sigmoid" if v3 else "softmax",
        renormalize=bool(cfg.norm_topk_prob) if v3 else False,  # V2's router never renormalises
        num_groups=cfg.n_group if grouped else 1,
        topk_groups=cfg.topk_group if grouped else 1,
        scale=cfg.routed_scaling_factor,
    )
    return MoESpec(
        num_experts=cfg.n_routed_experts,
        routing=routing,
        intermediate_size=cfg.moe_intermediate_size,
        sparse_layers=tuple(i >= cfg.first_k_dense_replace for i in range(cfg.num_hidden_layers)),
        shared_intermediate_size=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0),
        correction_bias=v3,
    )


def _moe(cfg: PretrainedConfig) -> MoESpec:
    if cfg.model_type in MLA_FAMILY:
        return _deepseek_moe(cfg)
    layers = range(cfg.num_hidden_layers)
    if cfg.model_type in ("mixtral", "gpt_oss"):
        gpt_oss = cfg.model_type == "gpt_oss"
        return MoESpec(
            num_experts=cfg.num_local_experts,
            routing=Routing(cfg.num_experts_per_tok, "topk_softmax" if gpt_oss else "softmax"),
            intermediate_size=cfg.intermediate_size,
            sparse_layers=tuple(True for _ in layers),
            bias=gpt_oss,
            swiglu_limit=cfg.swiglu_limit if gpt_oss else None,
            swiglu_alpha=getattr(cfg, "swiglu_alpha", 1.702),
        )
    # Qwen2-MoE / Qwen3-MoE: every decoder_sparse_step-th layer is sparse, except the mlp_only_layers
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
    return MoESpec(
        num_experts=cfg.num_experts,
        routing=Routing(cfg.num_experts_per_tok, renormalize=bool(cfg.norm_topk_prob)),
        intermediate_size=cfg.moe_intermediate_size,
        sparse_layers=tuple(i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0 for i in layers),
        shared_intermediate_size=shared,
        shared_expert_gate=shared > 0,
    )


def _hidden_act(cfg: PretrainedConfig) -> str:
    # as transformers 5 reads it: Gemma 2/3 from hidden_activation, Gemma 1 and the rest from hidden_act
    return cfg.hidden_activation if cfg.model_type in ("gemma2", "gemma3_text") else cfg.hidden_act


def _attn_logit_softcap(cfg: PretrainedConfig) -> float | None:
    # Gemma 3 configs carry attn_logit_softcapping too, but transformers never applies it
    return getattr(cfg, "attn_logit_softcapping", None) if cfg.model_type == "gemma2" else None


def _layer_types(cfg: PretrainedConfig) -> list[str]:
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    # no per-layer types (Llama, Mistral, Phi-3): every layer has the model-wide window, if any
    kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
    return [kind] * cfg.num_hidden_layers


def _sliding_window(cfg: PretrainedConfig, layer_type: str) -> int | None:
    return cfg.sliding_window if layer_type == "sliding_attention" else None


def _rope(cfg: PretrainedConfig, layer_type: str, head_dim: int) -> RopeConfig:
    params = _rope_parameters(cfg, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    rotary_dim = int(
        head_dim * params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
    )
    if rope_type == "linear":
        return RopeConfig(
            theta=params["rope_theta"], rotary_dim=rotary_dim, scaling="linear", factor=params["factor"]
        )
    if rope_type == "llama3":
        return RopeConfig(
            theta=params["rope_theta"],
            rotary_dim=rotary_dim,
            scaling="llama3",
            factor=params["factor"],
            low_freq_factor=params["low_freq_factor"],
            high_freq_factor=params["high_freq_factor"],
            original_max_position_embeddings=params["original_max_position_embeddings"],
        )
    if rope_type == "yarn":
        return _yarn(cfg, params, rotary_dim)
    return RopeConfig(theta=params["rope_theta"], rotary_dim=rotary_dim, scaling=rope_type)


def _yarn(cfg: PretrainedConfig, params: dict[str, Any], rotary_dim: int) -> RopeConfig:
    # as transformers' _compute_yarn_parameters reads its parameters
    original = params.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = params.get("factor") or cfg.max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return RopeConfig(
        theta=params["rope_theta"],
        rotary_dim=rotary_dim,
        scaling="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=params.get("beta_fast") or 32.0,
        beta_slow=params.get("beta_slow") or 1.0,
        truncate=params.get("truncate", True),
        attention_factor=float(attention_factor),
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_parameters(cfg: PretrainedConfig, layer_type: str) -> dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None)
    if params is not None:
        # transformers 5.x: flat, or keyed by layer type (Gemma 3)
        per_layer = layer_type in params and isinstance(params[layer_type], dict)
        return dict(params[layer_type] if per_layer else params)
    # transformers 4.x: rope_theta beside an optional rope_scaling dict
    params = dict(getattr(cfg, "rope_scaling", None) or {})
    local_base = getattr(cfg, "rope_local_base_freq", None)  # Gemma 3 sliding layers, unscaled
    if layer_type == "sliding_attention" and local_base is not None:
        return {"rope_theta": local_base}
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return params
