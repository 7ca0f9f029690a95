"""Opening a GGUF file as a Checkpoint: config, tokenizer and chat template from its metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from pagoda.loader.checkpoint import Checkpoint
from pagoda.loader.gguf_config import config_from_gguf, gguf_arch
from pagoda.loader.gguf_reader import GGUFFile
from pagoda.loader.gguf_tokenizer import eos_token_ids_from_gguf, tokenizer_from_gguf
from pagoda.loader.gguf_weights import iter_gguf_weights

_HALF_TYPES = {GGMLQuantizationType.BF16: torch.bfloat16, GGMLQuantizationType.F16: torch.float16}
_PLAIN_TYPES = {GGMLQuantizationType.F32, *_HALF_TYPES}


def open_gguf(path: Path) -> Checkpoint:
    file = GGUFFile(path)
    arch = gguf_arch(file)
    config = config_from_gguf(file)
    return Checkpoint(
        path=path,
        config=config,
        tokenizer_loader=lambda: tokenizer_from_gguf(file),
        chat_template=file.metadata.get("tokenizer.chat_template"),
        eos_token_ids=eos_token_ids_from_gguf(file),
        torch_dtype=_torch_dtype(file),
        weight_loader=lambda: iter_gguf_weights(file, arch, config),
        quantized_weight_loader=(
            lambda: iter_gguf_weights(file, arch, config, keep_quantized=True)
        ) if _is_block_quantized(file) else None,
    )


def _is_block_quantized(file: GGUFFile) -> bool:
    return any(info.ggml_type not in _PLAIN_TYPES for info in file.tensors.values())


def _torch_dtype(file: GGUFFile) -> torch.dtype:
    """A float file's half type (its norms stay F32 beside it); float32 for quantized files, whose
    weights dequantize to float32 (an engine serving on GPU narrows that, as vLLM does)."""
    types = {info.ggml_type for info in file.tensors.values()}
    if not types <= _PLAIN_TYPES:
        return torch.float32
    return next((dtype for ggml_type, dtype in _HALF_TYPES.items() if ggml_type in types), torch.float32)
