"""GGUF tensors -> Hugging Face checkpoint names and values.

llama.cpp renames every tensor (`blk.3.attn_q.weight`), and changes a few on the way in; this module
undoes both so the models load a GGUF exactly like a Hugging Face directory.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType

from pagoda.loader.checkpoint import QuantizedBlocks
from pagoda.loader.dequant import dequantize
from pagoda.loader.gguf_config import GGUFArch
from pagoda.loader.gguf_reader import GGUFFile, GGUFTensorInfo

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
    # mixtures of experts: the router, the experts stacked [E, ...], Qwen2-MoE's gated shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_SANDWICH_NORM_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_FUSED_LAYER_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}

# Tensors llama.cpp adds that are not model parameters; the config carries what they say.
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

# The linear layers' weights, which quantization="gguf" keeps in their blocks; embeddings, the LM head,
# norms, routers and the stacked experts (which run in full precision) are always expanded.
_LINEAR_WEIGHT_KINDS = {
    "attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv", "ffn_gate", "ffn_up", "ffn_down",
    "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
}

_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}

_MAX_LOAD_THREADS = 8
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(arch: GGUFArch, gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if match := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, kind, suffix = match.groups()
        names = _layer_names(arch)
        if kind in names:
            return f"model.layers.{layer}.{names[kind]}.{suffix}"
    else:
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart for {arch.architecture}")


def _layer_names(arch: GGUFArch) -> dict[str, str]:
    if arch.sandwich_norms:
        return _SANDWICH_NORM_LAYER_NAMES
    if arch.fused_projections:
        return _FUSED_LAYER_NAMES
    return _LAYER_NAMES


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order for llama-style rope.

    convert_hf_to_gguf.py writes each head's rows as `reshape(n_heads, 2, half, ...).swapaxes(1, 2)`
    (rotary halves interleaved); the inverse is the same swap read from the other side. Done on the raw
    bytes in numpy (any dtype, bfloat16 included) so it runs in the loader's threads without torch's.
    """
    half = weight.shape[0] // n_heads // 2
    same_bytes = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    rows = weight.contiguous().view(same_bytes).numpy().reshape(n_heads, half, 2, *weight.shape[1:])
    unpermuted = np.ascontiguousarray(rows.swapaxes(1, 2)).reshape(weight.shape)
    return torch.from_numpy(unpermuted).view(weight.dtype)


def iter_gguf_weights(
    file: GGUFFile, arch: GGUFArch, config: PretrainedConfig, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantizedBlocks]]:
    """Yield `(hf_name, tensor)` for every parameter in the file, in file order.

    Quantized tensors come back as float32 (with `keep_quantized`, the linear layers' ones as their raw
    `QuantizedBlocks`); F32/F16/BF16 ones in their stored dtype. Tensors are dequantized a few at a time
    ahead of the consumer, one per core, so memory holds only that window.
    """
    infos = [info for info in file.tensors.values() if info.name not in _CONFIG_ONLY_TENSORS]
    names = [hf_tensor_name(arch, info.name) for info in infos]  # fail on an unknown tensor before any work
    workers = min(_MAX_LOAD_THREADS, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gguf-dequant") as pool:
        pending: deque[Future[torch.Tensor | QuantizedBlocks]] = deque()
        try:
            for index, name in enumerate(names):
                while len(pending) < 2 * workers and index + len(pending) < len(infos):
                    info = infos[index + len(pending)]
                    pending.append(pool.submit(_load_tensor, file, info, arch, config, keep_quantized))
                yield name, pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _is_linear_weight(info: GGUFTensorInfo) -> bool:
    match = _LAYER_TENSOR.fullmatch(info.name)
    return match is not None and match.group(2) in _LINEAR_WEIGHT_KINDS and match.group(3) == "weight"


def _load_tensor(
    file: GGUFFile, info: GGUFTensorInfo, arch: GGUFArch, config: PretrainedConfig, keep_quantized: bool
) -> torch.Tensor | QuantizedBlocks:
    blocks = keep_quantized and info.ggml_type not in _FLOAT_TYPES and _is_linear_weight(info)
    if blocks:
        # blocks run along a row, so the rows are rows of bytes: the rope unpermute below moves them whole
        tensor = file.raw_bytes(info).view(*info.shape[:-1], -1)
    else:
        tensor = dequantize(file.raw_bytes(info), info.ggml_type, info.shape)
    if arch.rope_permuted:
        if ".attn_q." in info.name:
            tensor = unpermute_rope_rows(tensor, config.num_attention_heads)
        elif ".attn_k." in info.name:
            tensor = unpermute_rope_rows(tensor, config.num_key_value_heads)
    if arch.norms_plus_one and info.name.endswith("norm.weight"):
        # norms are small (one row), so this torch op never fans out to threads
        tensor = tensor.float() - 1.0
    return QuantizedBlocks(tensor, int(info.ggml_type), tuple(info.shape)) if blocks else tensor
