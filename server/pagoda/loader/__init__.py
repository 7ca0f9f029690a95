"""Model loaders: a Hugging Face directory, a GGUF file, or the embedded default model."""

from __future__ import annotations

from pathlib import Path

from pagoda.loader.checkpoint import Checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]


def open_checkpoint(model: str | Path | None) -> Checkpoint:
    """Open a Hugging Face model directory, a `.gguf` file, or (None) the embedded SmolLM2-135M-Instruct."""
    if model is None:
        from pagoda.embedded import embedded_model_path

        model = embedded_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        from pagoda.loader.hf import open_hf_directory

        return open_hf_directory(path)
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
