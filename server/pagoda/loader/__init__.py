"""Model loaders: a Hugging Face directory, a GGUF file, or the embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pagoda.loader.checkpoint import Checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Checkpoint", "open_checkpoint", "open_tokenizer"]


def open_checkpoint(model: str | Path | None, load_format: str = "auto") -> Checkpoint:
    """Open a Hugging Face model directory, a `.gguf` file, or (None) the embedded SmolLM2-135M-Instruct.

    `load_format="dummy"`: a directory whose weights will be random; it needs only its config.json.
    """
    if model is None:
        from pagoda.embedded import embedded_model_path

        model = embedded_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        from pagoda.loader.hf import open_hf_directory

        return open_hf_directory(path, with_weights=load_format != "dummy")
    if load_format == "dummy":
        raise ValueError(f"load_format dummy needs a Hugging Face model directory, not {str(model)!r}")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from pagoda.loader.gguf_checkpoint import open_gguf

        return open_gguf(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(model)!r} does not exist: expected a Hugging Face model directory or a .gguf file "
            "(models are never downloaded from a hub)"
        )
    raise ValueError(f"model {str(model)!r} is neither a Hugging Face model directory nor a .gguf file")


def open_tokenizer(tokenizer: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer of its own (`--tokenizer`): a Hugging Face tokenizer directory, or a .gguf file's."""
    path = Path(tokenizer).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        from pagoda.loader.gguf_reader import GGUFFile
        from pagoda.loader.gguf_tokenizer import tokenizer_from_gguf

        found = tokenizer_from_gguf(GGUFFile(path))
    elif path.is_dir():
        from pagoda.loader.hf import _tokenizer

        found = _tokenizer(path)
    else:
        raise FileNotFoundError(f"tokenizer {str(tokenizer)!r} is neither a directory nor a .gguf file")
    if found is None:
        raise ValueError(f"tokenizer {str(tokenizer)!r} holds no tokenizer")
    return found
