"""Model registry: Hugging Face architecture name -> our implementation, and `build_model`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagoda.models.decoder import DecoderForCausalLM
from pagoda.models.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# every architecture is the shared decoder, configured by its ModelSpec
MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "MistralForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
    "Phi3ForCausalLM": DecoderForCausalLM,
    "GemmaForCausalLM": DecoderForCausalLM,
    "Gemma2ForCausalLM": DecoderForCausalLM,
    "Gemma3ForCausalLM": DecoderForCausalLM,
    "MixtralForCausalLM": DecoderForCausalLM,
    "Qwen2MoeForCausalLM": DecoderForCausalLM,
    "Qwen3MoeForCausalLM": DecoderForCausalLM,
    "GptOssForCausalLM": DecoderForCausalLM,
    "DeepseekV2ForCausalLM": DecoderForCausalLM,
    "DeepseekV3ForCausalLM": DecoderForCausalLM,
}

# for configs without `architectures` (e.g. built from GGUF metadata)
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def resolve_architecture(hf_config: PretrainedConfig) -> str:
    architectures = getattr(hf_config, "architectures", None) or []
    arch = architectures[0] if architectures else MODEL_TYPES.get(hf_config.model_type, hf_config.model_type)
    if arch not in MODELS:
        raise ValueError(
            f"unsupported model architecture {arch!r} (model_type {hf_config.model_type!r}); "
            f"supported: {', '.join(MODELS)}"
        )
    return arch


def build_model(hf_config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An uninitialised model of the config's architecture, allocated on `device` in `dtype`.

    Its weights are empty until `load_weights` fills them from the checkpoint.
    """
    model_cls = MODELS[resolve_architecture(hf_config)]
    spec = ModelSpec.from_hf_config(hf_config)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(spec)
    finally:
        torch.set_default_dtype(previous_dtype)
    return model.eval()
