"""The CPU attention kernel written in C++ (`pagoda/csrc/paged_decode.cpp`, built with the rest of
`pagoda.cpu_extension`): attention that reads the paged cache in place, for steps whose sequences bring at
most MAX_QUERY_LEN new tokens each (decodes, speculative verification). Without the built library the torch
backend's gather + SDPA computes the same thing.
"""

from __future__ import annotations

import torch

from pagoda.attention.metadata import AttentionMetadata
from pagoda.cpu_extension import available

__all__ = ["MAX_HEAD_DIM", "MAX_QUERY_LEN", "paged_decode_attention", "serves"]

# The kernel scores 16 keys at a time for every query row of a KV head; a longer prefill chunk is a matrix
# product that SDPA (on the torch path) runs far faster.
MAX_QUERY_LEN = 8
# The widest head the kernel is compiled for; wider ones take the torch path.
MAX_HEAD_DIM = 256


def serves(max_query_len: int, head_dim: int) -> bool:
    """Whether the built kernel computes a step whose sequences bring at most `max_query_len` tokens."""
    return max_query_len <= MAX_QUERY_LEN and head_dim <= MAX_HEAD_DIM and available()


def paged_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Write this step's key/value [N, Hkv, D] into the cache, then attend: query [N, H, D], each
    sequence's new tokens causally over its context -> [N, H, D]. Needs `serves(...)`."""
    return torch.ops.pagoda.paged_decode_attention(
        query, key, value, k_cache, v_cache, md.slot_mapping, md.query_start_loc, md.block_tables,
        md.seq_lens, scale, sliding_window or 0, softcap or 0.0,
    )
