"""What the engine gets from a model on disk, whatever its format."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase


@dataclass
class QuantizedBlocks:
    """A weight kept in its file's block-quantized encoding (GGUF): each row of `data` holds the blocks of
    one output row, so row slices of `data` are row slices of the weight."""

    data: torch.Tensor  # uint8 [rows, row_bytes]; [E, rows, row_bytes] for stacked experts
    ggml_type: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # of the float weight, (rows, columns) or (E, rows, columns)

    def unstacked(self) -> list[QuantizedBlocks]:
        """Stacked experts [E, rows, columns] as one weight per expert."""
        return [QuantizedBlocks(data, self.ggml_type, self.shape[1:]) for data in self.data]


WeightIterator = Iterator[tuple[str, torch.Tensor]]
QuantizedWeightIterator = Iterator[tuple[str, "torch.Tensor | QuantizedBlocks"]]


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
    weight_loader: Callable[[], WeightIterator] = field(repr=False)
    # block-quantized files only: the same weights, linear layers' ones left in their blocks
    quantized_weight_loader: Callable[[], QuantizedWeightIterator] | None = field(default=None, repr=False)

    @property
    def is_block_quantized(self) -> bool:
        """A GGUF file whose weights are in quantized blocks (Q4_1, Q8_0, ...), not floats."""
        return self.quantized_weight_loader is not None

    def weights(self) -> WeightIterator:
        """`(hf_name, tensor)` pairs, e.g. `("model.layers.0.self_attn.q_proj.weight", tensor)`, on CPU."""
        return self.weight_loader()

    def quantized_weights(self) -> QuantizedWeightIterator:
        """Like `weights()`, but the linear layers' block-quantized weights come as `QuantizedBlocks`."""
        if self.quantized_weight_loader is None:
            raise ValueError(
                f"{self.path} holds no block-quantized weights: quantization='gguf' needs a quantized "
                "GGUF file (Q8_0, Q4_0, Q4_1, Q4_K, ...)"
            )
        return self.quantized_weight_loader()
