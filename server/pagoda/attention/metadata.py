"""Per-step attention metadata, set once before the forward and read by every attention layer.

The batch is flat: `num_tokens` new tokens from `num_seqs` sequences, mixing prefill chunks and
decodes. Sequence i owns rows query_start_loc[i]:query_start_loc[i+1] of the flat batch; its
new tokens sit at positions seq_lens[i] - query_len_i .. seq_lens[i] - 1 of its context, and attend
causally to every earlier token of the context (already in the paged cache, including this step's
tokens, which each layer writes before it attends).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) per new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # host copies, so the torch backend never syncs with the device to read them
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # values derived from the above that every layer needs (gather indices, masks): computed by the first
    # layer that attends, reused by the rest of the step's forward
    memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


_current: AttentionMetadata | None = None


def get_attention_metadata() -> AttentionMetadata:
    if _current is None:
        raise RuntimeError("attention metadata is only set inside a forward pass")
    return _current


@contextmanager
def attention_metadata(md: AttentionMetadata) -> Iterator[None]:
    global _current
    _current = md
    try:
        yield
    finally:
        _current = None
