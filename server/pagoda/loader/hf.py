"""Loading a Hugging Face model directory: config.json, safetensors (mmap) or pytorch_model.bin, tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pagoda.loader.checkpoint import Checkpoint

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def open_hf_directory(path: Path, with_weights: bool = True) -> Checkpoint:
    """`with_weights=False`: the weights will not be read (random ones stand in), so none need be there."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if not config.architectures:
        # a config saved from a bare model class; the causal-LM class of its model type is what we serve
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    weight_files = _weight_files(path) if with_weights else []
    tokenizer = _tokenizer(path)
    return Checkpoint(
        path=path,
        config=config,
        tokenizer_loader=lambda: tokenizer,
        chat_template=tokenizer.chat_template if tokenizer is not None else None,
        eos_token_ids=_eos_token_ids(path, config, tokenizer),
        torch_dtype=_torch_dtype(config, weight_files),
        weight_loader=lambda: _iter_weights(weight_files),
    )


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files (one, or the shards an index names), else the pytorch_model.bin ones."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (path / index).is_file():
            weight_map: dict[str, str] = json.loads((path / index).read_text())["weight_map"]
            shards = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(shard) for shard in shards if not shard.is_file()]
            if missing:
                raise FileNotFoundError(f"{path / index} names shards that are missing: {', '.join(missing)}")
            return shards
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(
        f"{path} has no weights: expected model.safetensors, model.safetensors.index.json with its shards, "
        "or pytorch_model.bin"
    )


def _iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt", device="cpu") as shard:  # memory-mapped
                for name in shard.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, shard.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", mmap=True, weights_only=True).items()


def _tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def _eos_token_ids(
    path: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None
) -> list[int]:
    """generation_config.json's eos_token_id wins (it lists every end-of-turn token), then config.json's."""
    eos = None
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, list) else [int(eos)]


def _torch_dtype(config: PretrainedConfig, weight_files: list[Path]) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    # no dtype in config.json: the first floating-point tensor's says what the weights are
    for _, tensor in _iter_weights(weight_files):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
