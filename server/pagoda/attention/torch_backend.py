"""Paged attention in plain torch: the CPU path, and the reference the Triton kernels are tested against.

Caches are [num_blocks, block_size, num_kv_heads, head_dim]. A sequence's context is gathered from its
blocks through its block table, then attended with torch SDPA (or explicit math when the logits are
soft-capped, which SDPA cannot do). Decodes in a batch share one padded SDPA call; each prefill chunk gets
its own call, since its query length differs from the others'. Everything is computed in float32.

An fp8 (e4m3) cache holds K/V divided by a per-layer `k_scale` / `v_scale`: quantized as they are
written, dequantized as they are gathered. Other caches ignore the scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagoda.attention.metadata import AttentionMetadata


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store each token's key/value at its cache slot (block * block_size + offset); slots < 0 are skipped."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if k_cache.dtype == torch.float8_e4m3fn:
        # The cast saturates at +-448, so a value past the calibrated range clips instead of turning NaN.
        # index_copy_ has no fp8 kernel on the CPU: the bytes are copied as uint8.
        key = (key.float() / k_scale).to(k_cache.dtype).view(torch.uint8)
        value = (value.float() / v_scale).to(v_cache.dtype).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    # view (not reshape): the write must land in the cache itself, never in a copy
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (query [N, H, D]) over its cached context."""
    cache_scales = (k_scale, v_scale)
    out = torch.empty_like(query)
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    start = 0
    for seq, (query_len, seq_len) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu)):
        if query_len == 1:
            decode_rows.append(start)
            decode_seqs.append(seq)
        elif query_len > 1:
            out[start : start + query_len] = _prefill_attention(
                query[start : start + query_len],
                k_cache,
                v_cache,
                md.block_tables[seq],
                seq_len,
                scale,
                sliding_window,
                softcap,
                cache_scales,
            )
        start += query_len
    if decode_seqs:
        all_decode = len(decode_rows) == query.shape[0]
        rows = slice(None) if all_decode else torch.tensor(decode_rows, device=query.device)
        out[rows] = _decode_attention(
            query[rows],
            k_cache,
            v_cache,
            md.block_tables[decode_seqs],
            [md.seq_lens_cpu[s] for s in decode_seqs],
            scale,
            sliding_window,
            softcap,
            cache_scales,
        )
    return out


def _prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    cache_scales: tuple[float, float],
) -> torch.Tensor:
    """One sequence's chunk of query_len new tokens, the last ones of its seq_len-token context."""
    query_len = query.shape[0]
    block_size = k_cache.shape[1]
    first_query_pos = seq_len - query_len
    # keys before the first query's window are never seen: skip gathering them
    first_key = 0 if sliding_window is None else max(0, first_query_pos - sliding_window + 1)
    first_block = first_key // block_size
    blocks = block_table[first_block : -(-seq_len // block_size)].long()
    skip = first_key - first_block * block_size
    context = slice(skip, seq_len - first_block * block_size)
    keys = _gather(k_cache, blocks, cache_scales[0]).flatten(0, 1)[context]
    values = _gather(v_cache, blocks, cache_scales[1]).flatten(0, 1)[context]

    query_pos = torch.arange(first_query_pos, seq_len, device=query.device)
    key_pos = torch.arange(first_key, seq_len, device=query.device)
    mask = _visible(query_pos[:, None], key_pos[None, :], sliding_window)
    return _attend(query[None], keys[None], values[None], mask[None], scale, softcap)[0]


def _decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    cache_scales: tuple[float, float],
) -> torch.Tensor:
    """One new token per sequence (query [B, H, D]), contexts padded to the longest and masked."""
    block_size = k_cache.shape[1]
    num_blocks = -(-max(seq_lens) // block_size)
    tables = block_tables[:, :num_blocks].long()
    keys = _gather(k_cache, tables, cache_scales[0]).flatten(1, 2)  # [B, num_blocks * block_size, Hkv, D]
    values = _gather(v_cache, tables, cache_scales[1]).flatten(1, 2)

    lens = torch.tensor(seq_lens, device=query.device)
    key_pos = torch.arange(keys.shape[1], device=query.device)
    # the padding past each context is masked by causality: its positions exceed the query's
    mask = _visible((lens - 1)[:, None, None], key_pos[None, None, :], sliding_window)
    return _attend(query[:, None], keys, values, mask, scale, softcap)[:, 0]


def _gather(cache: torch.Tensor, blocks: torch.Tensor, scale: float) -> torch.Tensor:
    """The cache blocks `blocks` index, as float32 values when the cache holds scaled fp8."""
    if cache.dtype != torch.float8_e4m3fn:
        return cache[blocks]
    return cache[blocks].float() * scale


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Causal mask, narrowed to the last `sliding_window` positions (Hugging Face semantics)."""
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask = mask & (key_pos > query_pos - sliding_window)
    return mask


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """query [B, L, H, D], keys/values [B, S, Hkv, D], mask [B, L, S] -> [B, L, H, D], in float32.

    Query heads that share a KV head are stacked along the query axis, so K/V are never repeated.
    """
    batch, query_len, num_heads, head_dim = query.shape
    num_kv_heads, key_len = keys.shape[2], keys.shape[1]
    group = num_heads // num_kv_heads
    q = query.float().view(batch, query_len, num_kv_heads, group, head_dim)
    q = q.permute(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, group * query_len, head_dim)
    k = keys.float().transpose(1, 2)
    v = values.float().transpose(1, 2)
    m = mask[:, None, None].expand(batch, 1, group, query_len, key_len).reshape(batch, 1, -1, key_len)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~m, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v)
    out = out.view(batch, num_kv_heads, group, query_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, query_len, num_heads, head_dim).to(query.dtype)
