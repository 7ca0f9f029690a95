"""A model config rebuilt from GGUF metadata (llama.cpp's key names -> Hugging Face fields).

The plain dense families (llama, qwen2, qwen3: the embedded SmolLM2 among them) get a `GGUFModelConfig`,
which holds what transformers' config class would hold and reads the same for `ModelSpec`, without
importing transformers: its config classes pull in ~2 s of imports (torch.distributed.tensor, sympy,
accelerate), a third of `pagoda serve`'s cold start. The other families get transformers' own class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pagoda.loader.dequant import dequantize
from pagoda.loader.gguf_reader import GGUFFile

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class GGUFArch:
    """What differs per GGUF architecture: the HF classes, and how llama.cpp changed the tensors."""

    def __init__(
        self,
        model_type: str,
        architecture: str,
        *,
        rope_permuted: bool = False,
        norms_plus_one: bool = False,
        sandwich_norms: bool = False,
        fused_projections: bool = False,
    ):
        self.model_type = model_type
        self.architecture = architecture
        # llama.cpp interleaves the rotary halves of Q/K rows for llama-style (non-NeoX) rope
        self.rope_permuted = rope_permuted
        # llama.cpp stores Gemma's RMSNorm weights as (1 + w)
        self.norms_plus_one = norms_plus_one
        # Gemma 2/3: ffn_norm is the pre-FFN norm and there are post-attention / post-FFN norms
        self.sandwich_norms = sandwich_norms
        # Phi-3 keeps fused qkv_proj and gate_up_proj
        self.fused_projections = fused_projections


GGUF_ARCHS: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", rope_permuted=True),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM"),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM"),
    "gemma": GGUFArch("gemma", "GemmaForCausalLM", norms_plus_one=True),
    "gemma2": GGUFArch("gemma2", "Gemma2ForCausalLM", norms_plus_one=True, sandwich_norms=True),
    "gemma3": GGUFArch("gemma3_text", "Gemma3ForCausalLM", norms_plus_one=True, sandwich_norms=True),
    "phi3": GGUFArch("phi3", "Phi3ForCausalLM", fused_projections=True),
    "qwen2moe": GGUFArch("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": GGUFArch("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# llama.cpp writes Mixtral as a llama whose blocks have experts
_MIXTRAL = GGUFArch("mixtral", "MixtralForCausalLM", rope_permuted=True)

# llama.cpp's layer counts of the Gemma sizes that scale queries by hidden/heads instead of head_dim
_GEMMA_QUERY_SCALE_BY_HIDDEN = {"gemma2": 46, "gemma3": 62}  # the 27B models


def gguf_arch(file: GGUFFile) -> GGUFArch:
    if file.architecture == "llama" and file.metadata.get("llama.expert_count"):
        return _MIXTRAL
    arch = GGUF_ARCHS.get(file.architecture)
    if arch is None:
        raise ValueError(
            f"{file.path}: GGUF architecture {file.architecture!r} is not supported; "
            f"supported: {', '.join(sorted(GGUF_ARCHS))}"
        )
    return arch


class GGUFModelConfig:
    """The fields transformers' config class of `model_type` would have for these arguments, for the
    families whose defaults are listed in `_OWN_CONFIG_DEFAULTS` (tests compare the `ModelSpec` read from
    both); `to_transformers()` builds transformers' own config from the same arguments."""

    def __init__(self, model_type: str, kwargs: dict[str, Any]) -> None:
        self.model_type = model_type
        self.kwargs = dict(kwargs)
        fields = {k: v for k, v in kwargs.items() if k not in ("rope_theta", "rope_scaling")}
        self.__dict__.update(_OWN_CONFIG_DEFAULTS[model_type], **fields)
        if model_type != "llama":  # Qwen's configs list the (all full) attention of each layer
            self.layer_types = ["full_attention"] * kwargs["num_hidden_layers"]
        # transformers 5's spelling: the scaling fields beside rope_theta and rope_type
        self.rope_parameters = {
            "rope_type": "default",
            **(kwargs.get("rope_scaling") or {}),
            "rope_theta": kwargs.get("rope_theta", 10000.0),
        }

    def to_transformers(self) -> PretrainedConfig:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_type](**self.kwargs)

    def __repr__(self) -> str:
        return f"GGUFModelConfig({self.model_type!r}, {self.kwargs!r})"


# what each family's transformers config sets by default, of the fields ModelSpec reads
_OWN_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    "qwen2": {"hidden_act": "silu", "sliding_window": None},
    "qwen3": {"hidden_act": "silu", "attention_bias": False, "sliding_window": None},
}


def _own_config_fits(model_type: str, kwargs: dict[str, Any]) -> bool:
    """Our config covers the plain cases only: no sliding window, no rope scaling but Llama 3's or linear."""
    scaling = kwargs.get("rope_scaling")
    return (
        model_type in _OWN_CONFIG_DEFAULTS
        and "rope_theta" in kwargs
        and "sliding_window" not in kwargs
        and (scaling is None or scaling["rope_type"] in ("llama3", "linear"))
    )


def config_from_gguf(file: GGUFFile) -> GGUFModelConfig | PretrainedConfig:
    arch = gguf_arch(file)
    meta = file.metadata
    prefix = file.architecture

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{prefix}.{key}", default)

    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden_size // num_heads)
    if arch.fused_projections:  # Phi-3: rope may cover only part of the head
        head_dim = hidden_size // num_heads
    kwargs: dict[str, Any] = {
        "architectures": [arch.architecture],
        # the embedding matrix is the truth; llama.vocab_size is optional and may be padded differently
        "vocab_size": file.tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden_size,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _single_kv_head_count(get("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "bos_token_id": _optional_int(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _optional_int(meta.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _optional_int(meta.get("tokenizer.ggml.padding_token_id")),
    }
    if get("rope.freq_base") is not None:
        kwargs["rope_theta"] = float(get("rope.freq_base"))
    if get("attention.sliding_window") is not None:
        kwargs["sliding_window"] = int(get("attention.sliding_window"))
    rope_scaling = _rope_scaling(file, prefix, get)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    if arch.fused_projections:
        _add_phi3_fields(file, get, kwargs)
    if arch.sandwich_norms:
        _add_gemma_fields(file.architecture, get, kwargs)
    if get("expert_count"):
        _add_moe_fields(file, arch.model_type, get, kwargs)
    if _own_config_fits(arch.model_type, kwargs):
        return GGUFModelConfig(arch.model_type, kwargs)
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[arch.model_type](**kwargs)


def _add_moe_fields(file: GGUFFile, model_type: str, get: Any, kwargs: dict[str, Any]) -> None:
    kwargs["num_experts_per_tok"] = int(get("expert_used_count"))
    if model_type == "mixtral":
        kwargs["num_local_experts"] = int(get("expert_count"))
        return
    kwargs["num_experts"] = int(get("expert_count"))
    kwargs["moe_intermediate_size"] = int(get("expert_feed_forward_length"))
    # llama.cpp renormalises Qwen3-MoE's top-k weights and not Qwen2-MoE's, unless the file says
    kwargs["norm_topk_prob"] = bool(get("expert_weights_norm", model_type == "qwen3_moe"))
    # no key says which layers keep a dense MLP (Qwen's mlp_only_layers): the tensors do
    kwargs["mlp_only_layers"] = [
        layer for layer in range(kwargs["num_hidden_layers"])
        if f"blk.{layer}.ffn_gate_exps.weight" not in file.tensors
    ]
    if get("expert_shared_feed_forward_length") is not None:
        kwargs["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _single_kv_head_count(value: Any) -> int:
    """Some files list the KV head count per layer; our models need one number."""
    if hasattr(value, "__len__"):
        counts = {int(v) for v in value}
        if len(counts) != 1:
            raise ValueError(f"per-layer KV head counts {sorted(counts)} are not supported")
        return counts.pop()
    return int(value)


def _rope_scaling(file: GGUFFile, prefix: str, get: Any) -> dict[str, Any] | None:
    scaling_type = get("rope.scaling.type")
    if scaling_type in ("linear", "yarn"):
        scaling: dict[str, Any] = {
            "rope_type": scaling_type,
            "factor": float(get("rope.scaling.factor", 1.0)),
        }
        if get("rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        return scaling
    if "rope_freqs.weight" in file.tensors:
        return _llama3_rope_scaling(file, float(get("rope.freq_base", 10000.0)))
    if scaling_type not in (None, "none"):
        raise ValueError(f"{file.path}: rope scaling type {scaling_type!r} is not supported")
    return None


def _llama3_rope_scaling(file: GGUFFile, theta: float) -> dict[str, Any]:
    """Llama 3.1+ stores its rope scaling only as the per-frequency divisors (`rope_freqs`).

    Every Llama 3.x release uses low/high frequency factors 1 and 4 over an 8192-token original
    context, varying only the factor; recover the factor and check the divisors match exactly.
    """
    info = file.tensors["rope_freqs.weight"]
    divisors = dequantize(file.raw_bytes(info), info.ggml_type, info.shape).float()
    factor = float(divisors.max())
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if not torch.allclose(_llama3_divisors(theta, 2 * divisors.numel(), scaling), divisors, rtol=1e-4):
        raise ValueError(f"{file.path}: rope_freqs does not follow Llama 3's scaling; it is not supported")
    return scaling


def _llama3_divisors(theta: float, dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """llama.cpp's rope_freqs for Llama 3 scaling (convert_hf_to_gguf.py, LlamaModel)."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * torch.pi / freqs
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen = old_context / scaling["low_freq_factor"]
    high_wavelen = old_context / scaling["high_freq_factor"]
    smooth = (old_context / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    divisors = 1.0 / ((1 - smooth) / scaling["factor"] + smooth)
    divisors = torch.where(wavelen < high_wavelen, torch.ones_like(divisors), divisors)
    divisors = torch.where(wavelen > low_wavelen, torch.full_like(divisors, scaling["factor"]), divisors)
    return divisors.float()


def _add_phi3_fields(file: GGUFFile, get: Any, kwargs: dict[str, Any]) -> None:
    rotary_dim = get("rope.dimension_count")
    if rotary_dim is not None:
        kwargs["partial_rotary_factor"] = int(rotary_dim) / kwargs["head_dim"]
    if "rope_factors_long.weight" in file.tensors:
        factors = {}
        for kind in ("long", "short"):
            info = file.tensors[f"rope_factors_{kind}.weight"]
            factors[kind] = dequantize(file.raw_bytes(info), info.ggml_type, info.shape).float().tolist()
        original = int(get("rope.scaling.original_context_length", kwargs["max_position_embeddings"]))
        kwargs["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": factors["long"],
            "short_factor": factors["short"],
            "original_max_position_embeddings": original,
        }
        kwargs["original_max_position_embeddings"] = original


def _add_gemma_fields(architecture: str, get: Any, kwargs: dict[str, Any]) -> None:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if get(key) is not None:
            kwargs[key] = float(get(key))
    if kwargs["num_hidden_layers"] == _GEMMA_QUERY_SCALE_BY_HIDDEN[architecture]:
        kwargs["query_pre_attn_scalar"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    else:
        kwargs["query_pre_attn_scalar"] = kwargs["head_dim"]
    if architecture == "gemma3" and get("rope.freq_base_swa") is not None:
        kwargs["rope_local_base_freq"] = float(get("rope.freq_base_swa"))
