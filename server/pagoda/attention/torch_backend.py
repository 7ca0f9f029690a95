"""Paged attention in plain torch: the CPU path, and the reference the Triton kernels are tested against.

Caches are [num_blocks, block_size, num_kv_heads, head_dim]. A sequence's context is gathered from its
blocks through its block table (`index_select`, a row copy per block), then attended with torch SDPA (or
explicit math when the logits are soft-capped, which SDPA cannot do). Decodes share padded SDPA calls,
grouped by context length (`_length_groups`); each prefill chunk gets its own call, since its query length
differs from the others'.

What to gather and the masks depend only on the step's metadata, not on the layer: the calls (`_Part`s)
are planned by the first layer that attends and reused by the others (one plan per sliding window, for
Gemma's alternation).

An fp8 (e4m3) cache holds K/V divided by a per-layer `k_scale` / `v_scale`: quantized as they are
written, dequantized as they are gathered. Other caches ignore the scales.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    valid = _valid_slots(slot_mapping)
    if valid is not None:
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if k_cache.dtype == torch.float8_e4m3fn:
        # The cast saturates at +-448, so a value past the calibrated range clips instead of turning NaN.
        # index_copy_ has no fp8 kernel on the CPU: the bytes are copied as uint8.
        key = (key.float() / k_scale).to(k_cache.dtype).view(torch.uint8)
        value = (value.float() / v_scale).to(v_cache.dtype).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    # view (not reshape): the write must land in the cache itself, never in a copy; the casts are skipped
    # when they are no-ops (a decode step of one sequence runs ~50 ops per layer: each counts)
    key = key if key.dtype == k_cache.dtype else key.to(k_cache.dtype)
    value = value if value.dtype == v_cache.dtype else value.to(v_cache.dtype)
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


# (slot_mapping, its mask of valid slots or None when all are): every layer of a step writes to the same
# slots, so the check (three ops, and a device sync on a GPU) runs once per step. Holding the tensor keeps
# its identity from being reused by another step's.
_last_slots: tuple[torch.Tensor, torch.Tensor | None] | None = None


def _valid_slots(slot_mapping: torch.Tensor) -> torch.Tensor | None:
    """The mask of slots >= 0, or None when every slot is."""
    global _last_slots
    if _last_slots is None or _last_slots[0] is not slot_mapping:
        valid = slot_mapping >= 0
        _last_slots = (slot_mapping, None if bool(valid.all()) else valid)
    return _last_slots[1]


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
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (query [N, H, D]) over its cached context. `sinks`
    [H]: a logit per head that joins each softmax's denominator with no value (gpt-oss)."""
    group = query.shape[1] // k_cache.shape[2]
    # SDPA runs in the cache's dtype; soft-capped logits and dequantized fp8 in float32
    exact = softcap is not None or sinks is not None or k_cache.dtype == torch.float8_e4m3fn
    dtype = torch.float32 if exact else k_cache.dtype
    parts = _plan(md, k_cache.shape[1], group, sliding_window, dtype)
    scales = (k_scale, v_scale)
    if len(parts) == 1 and parts[0].rows is ALL_ROWS:  # one call for the whole batch: no output copy
        return _attend_part(query, k_cache, v_cache, parts[0], scale, softcap, scales, sinks)
    out = torch.empty_like(query)
    for part in parts:
        out[part.rows] = _attend_part(query, k_cache, v_cache, part, scale, softcap, scales, sinks)
    return out


def _attend_part(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    part: _Part,
    scale: float,
    softcap: float | None,
    kv_scales: tuple[float, float],
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One SDPA call's rows of the output, [rows, H, D] in the query's dtype."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = _gather(k_cache, part.blocks, kv_scales[0]).view(part.num_seqs, -1, num_kv_heads, head_dim)
    values = _gather(v_cache, part.blocks, kv_scales[1]).view(part.num_seqs, -1, num_kv_heads, head_dim)
    if part.context is not None:
        keys, values = keys[:, part.context], values[:, part.context]
    q = query if part.rows is ALL_ROWS else query[part.rows]
    if part.query_len == 1:  # decodes: [B, H, D] -> [B, Hkv, group, D]
        q = q.view(part.num_seqs, num_kv_heads, group, head_dim)
    else:  # one prefill chunk: [L, H, D] -> [1, Hkv, group * L, D], rows ordered (group, query)
        q = q.view(part.query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        q = q.reshape(1, num_kv_heads, group * part.query_len, head_dim)
    sink_rows = None if sinks is None else _sink_rows(sinks, num_kv_heads, group, part.query_len)
    attended = _attend(q, keys, values, part.bias, scale, softcap, sink_rows)
    if part.query_len > 1:
        attended = attended.view(num_kv_heads, group, part.query_len, head_dim).permute(2, 0, 1, 3)
    attended = attended.reshape(-1, num_heads, head_dim)
    # (a step of one sequence runs ~30 ops per layer here: skip the no-op cast of same-dtype K/V)
    return attended if attended.dtype == query.dtype else attended.to(query.dtype)


ALL_ROWS = slice(None)  # a _Part's rows when it is the whole batch


@dataclass
class _Part:
    """One SDPA call: all the step's decodes, or one prefill chunk."""

    rows: slice | torch.Tensor  # of the flat batch
    num_seqs: int
    query_len: int  # 1 for the decodes
    blocks: torch.Tensor  # [num_seqs * blocks_per_seq] int64: the cache blocks to gather, in order
    context: slice | None  # the gathered keys the chunk sees (None: all of them)
    bias: torch.Tensor  # additive mask, 0 where visible and -inf elsewhere: [num_seqs, 1, rows, keys]


def _plan(
    md: AttentionMetadata, block_size: int, group: int, sliding_window: int | None, dtype: torch.dtype
) -> list[_Part]:
    key = ("torch", block_size, group, sliding_window, dtype)
    if key not in md.memo:
        md.memo[key] = _build_plan(md, block_size, group, sliding_window, dtype)
    return md.memo[key]


def _build_plan(
    md: AttentionMetadata, block_size: int, group: int, sliding_window: int | None, dtype: torch.dtype
) -> list[_Part]:
    device = md.block_tables.device
    parts: list[_Part] = []
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    start = 0
    for seq, query_len in enumerate(md.query_lens_cpu):
        if query_len == 1:
            decode_rows.append(start)
            decode_seqs.append(seq)
        elif query_len > 1:
            parts.append(_prefill_part(md, seq, start, block_size, group, sliding_window, dtype))
        start += query_len
    groups = _length_groups([md.seq_lens_cpu[s] for s in decode_seqs])
    for members in groups:
        seqs = [decode_seqs[i] for i in members]
        seq_lens = torch.tensor([md.seq_lens_cpu[s] for s in seqs], device=device)
        num_blocks = -(-max(md.seq_lens_cpu[s] for s in seqs) // block_size)
        blocks = md.block_tables[seqs, :num_blocks].flatten().long()
        key_pos = torch.arange(num_blocks * block_size, device=device)
        # the padding past each context is masked by causality: its positions exceed the query's
        visible = _visible((seq_lens - 1)[:, None], key_pos[None, :], sliding_window)
        whole_batch = len(groups) == 1 and len(decode_rows) == start
        rows = ALL_ROWS if whole_batch else torch.tensor([decode_rows[i] for i in members], device=device)
        parts.append(_Part(rows, len(seqs), 1, blocks, None, _bias(visible, dtype)[:, None, None, :]))
    return parts


# What one more SDPA call per layer costs, in padded keys x sequences (measured on 2 AVX-512 cores:
# ~50 us against ~30 ns per padded key of one sequence)
_GROUP_COST = 2048


def _length_groups(seq_lens: list[int]) -> list[list[int]]:
    """Decodes padded to the longest context of their call: split them, by length, into calls whose
    padding costs more than the extra calls would. Greedy over the lengths in ascending order."""
    order = sorted(range(len(seq_lens)), key=seq_lens.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) * (seq_lens[i] - seq_lens[groups[-1][-1]]) <= _GROUP_COST:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [sorted(group) for group in groups]  # batch order within a call: one call is the whole batch


def _prefill_part(
    md: AttentionMetadata,
    seq: int,
    start: int,
    block_size: int,
    group: int,
    sliding_window: int | None,
    dtype: torch.dtype,
) -> _Part:
    """One sequence's chunk of query_len new tokens, the last ones of its seq_len-token context."""
    query_len, seq_len = md.query_lens_cpu[seq], md.seq_lens_cpu[seq]
    device = md.block_tables.device
    first_query_pos = seq_len - query_len
    # keys before the first query's window are never seen: skip gathering them
    first_key = 0 if sliding_window is None else max(0, first_query_pos - sliding_window + 1)
    first_block = first_key // block_size
    blocks = md.block_tables[seq, first_block : -(-seq_len // block_size)].long()
    skip = first_key - first_block * block_size
    context = slice(skip, seq_len - first_block * block_size)

    query_pos = torch.arange(first_query_pos, seq_len, device=device)
    key_pos = torch.arange(first_key, seq_len, device=device)
    visible = _visible(query_pos[:, None], key_pos[None, :], sliding_window)  # [L, S]
    bias = _bias(visible, dtype).repeat(group, 1)  # the rows of each KV head are (group, query) pairs
    return _Part(slice(start, start + query_len), 1, query_len, blocks, context, bias[None, None])


def _gather(cache: torch.Tensor, blocks: torch.Tensor, scale: float) -> torch.Tensor:
    """The cache blocks `blocks` index, as float32 values when the cache holds scaled fp8."""
    if cache.dtype != torch.float8_e4m3fn:
        return cache.index_select(0, blocks)
    # index_select has no fp8 kernel on the CPU: gather the bytes
    return cache.view(torch.uint8).index_select(0, blocks).view(cache.dtype).float() * scale


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Causal mask, narrowed to the last `sliding_window` positions (Hugging Face semantics)."""
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask = mask & (key_pos > query_pos - sliding_window)
    return mask


def _bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, float("-inf"))


def _sink_rows(sinks: torch.Tensor, num_kv_heads: int, group: int, query_len: int) -> torch.Tensor:
    """The sink logit of each query row of `_attend`, [1, Hkv, R, 1]: rows are (group, query) pairs."""
    per_row = sinks.float().view(num_kv_heads, group, 1).expand(num_kv_heads, group, query_len)
    return per_row.reshape(1, num_kv_heads, group * query_len, 1)


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    softcap: float | None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, Hkv, R, D] (the R query rows of each KV head), keys/values [B, S, Hkv, D], additive mask
    broadcastable to [B, 1, R, S] -> [B, Hkv, R, D]. Query heads that share a KV head are rows of one
    matrix, so K/V are never repeated. SDPA runs in the cache's dtype (its CPU kernel accumulates half
    precision in float32, as transformers' SDPA path does): converting the gathered K/V to float32 would
    cost more than the attention itself. Soft-capped logits and sinks are computed in float32."""
    if softcap is None and sinks is None:
        q = query if query.dtype == keys.dtype else query.to(keys.dtype)
        k, v = keys.transpose(1, 2), values.transpose(1, 2)
        with _one_thread_if_few_items(q, k.shape[2]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    q = query.float()
    k = keys.float().transpose(1, 2)
    v = values.float().transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores + bias
    if sinks is None:
        return torch.matmul(scores.softmax(dim=-1), v)
    scores = torch.cat((scores, sinks.expand(scores.shape[0], -1, -1, 1)), dim=-1)
    return torch.matmul(scores.softmax(dim=-1)[..., :-1], v)


# SDPA's CPU kernel splits its work into (batch, KV head, block of 256 query rows) items over all threads and
# sizes per-thread buffers by the thread count. With fewer items than two per thread the split is uneven (3
# items on 2 threads: 1.5x at best), and on 2 Sapphire Rapids cores waking the other thread cost more than
# it saved up to ~2k keys (a decode of one SmolLM2 sequence, 288 keys: 31-40 us on one thread, 40-270 on
# two, depending on the machine's load).
_ONE_THREAD_MAX_KEYS = 2048


@contextmanager
def _one_thread_if_few_items(query: torch.Tensor, num_keys: int) -> Iterator[None]:
    """Run the block on one CPU thread when SDPA over `query` [B, Hkv, R, D] has too few items to share."""
    threads = torch.get_num_threads()
    batch, heads, rows = query.shape[:3]
    items = batch * heads * -(-rows // 256)
    if query.device.type != "cpu" or threads == 1 or items >= 2 * threads or num_keys > _ONE_THREAD_MAX_KEYS:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
