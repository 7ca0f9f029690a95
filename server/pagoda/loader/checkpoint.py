"""What the engine gets from a model on disk, whatever its format."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    from pagoda.loader.gguf_config import GGUFModelConfig


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

    `weights()` reads lazily, one tensor at a time, so a large model never sits in memory twice; the
    tokenizer is built on first use, or on a thread of its own from `prefetch_tokenizer()` on.
    """

    path: Path
    # of the model's own class (LlamaConfig, ...), `architectures` set; for the plain GGUF families a
    # GGUFModelConfig that reads the same (its to_transformers() gives the transformers class)
    config: PretrainedConfig | GGUFModelConfig
    # a fast tokenizer; None when a directory ships none
    tokenizer_loader: Callable[[], PreTrainedTokenizerBase | None] = field(repr=False)
    chat_template: str | None  # also set on the tokenizer, so apply_chat_template works
    eos_token_ids: list[int]  # every id that ends generation, the primary EOS first
    torch_dtype: torch.dtype  # the weights' own dtype, what dtype="auto" means
    weight_loader: Callable[[], WeightIterator] = field(repr=False)
    # block-quantized files only: the same weights, linear layers' ones left in their blocks
    quantized_weight_loader: Callable[[], QuantizedWeightIterator] | None = field(default=None, repr=False)

    _prefetched: Future[PreTrainedTokenizerBase | None] | None = field(default=None, init=False, repr=False)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self._prefetched.result() if self._prefetched is not None else self.tokenizer_loader()

    def prefetch_tokenizer(self) -> None:
        """Start building the tokenizer on a thread while the caller loads the weights (their tensor work
        runs without the GIL): importing transformers for it takes a second or two of `pagoda serve`'s
        cold start. `tokenizer` waits for it, and raises what it raised."""
        if self._prefetched is not None or "tokenizer" in self.__dict__:
            return
        future: Future[PreTrainedTokenizerBase | None] = Future()

        def build() -> None:
            try:
                future.set_result(self.tokenizer_loader())
            except BaseException as error:  # handed to whoever reads `tokenizer`
                future.set_exception(error)

        self._prefetched = future
        threading.Thread(target=build, name="pagoda-tokenizer", daemon=True).start()

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
