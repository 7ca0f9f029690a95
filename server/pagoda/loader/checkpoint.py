"""What the engine gets from a model on disk, whatever its format."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase


@dataclass
class Checkpoint:
    """A model's config, tokenizer and weights under Hugging Face names.

    `weights()` reads lazily, one tensor at a time, so a large model never sits in memory twice.
    """

    path: Path
    config: PretrainedConfig  # of the model's own class (LlamaConfig, ...), `architectures` set
    tokenizer: PreTrainedTokenizerBase | None  # a fast tokenizer; None when a directory ships none
    chat_template: str | None  # also set on the tokenizer, so apply_chat_template works
    eos_token_ids: list[int]  # every id that ends generation, the primary EOS first
    torch_dtype: torch.dtype  # the weights' own dtype, what dtype="auto" means
    weight_loader: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`(hf_name, tensor)` pairs, e.g. `("model.layers.0.self_attn.q_proj.weight", tensor)`, on CPU."""
        return self.weight_loader()
