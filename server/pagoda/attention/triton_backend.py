"""Triton attention backend (GPU): the KV-cache write and attention of a flat batch over the paged cache.

Same interface as the torch backend: `write_kv(...)` and `paged_attention(...)`.

One attention kernel serves prefill chunks and decodes alike (the layout of vLLM's unified Triton
attention). A program takes BLOCK_Q query tokens of one sequence times the query heads that share one
KV head, so the BLOCK_M = BLOCK_Q * GROUP_P rows of its Q tile reuse every K/V tile it loads (GQA/MQA
for free, and decode tiles reach the 16 rows tensor cores need). It walks the sequence's block table in
tiles of TILE_N keys, gathering each key's slot through the table, with an online softmax (flash
attention). When a decode batch is too small to fill the GPU, the key range is split into segments run
by separate programs, and a second kernel merges their partial results (flash decoding).

Lengths and block tables are read from device tensors only: a CUDA graph captured for a batch shape
(number of tokens and sequences) replays correctly whatever the sequences' lengths.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda.attention.metadata import AttentionMetadata

# Running maximum before any key is seen: finite, so fully masked rows give exp2(-inf - m) = 0 and
# exp2(m - m) = 1 instead of NaN from (-inf) - (-inf).
_NO_MAX = tl.constexpr(-1.0e30)
_LOG2E = tl.constexpr(1.4426950408889634)
_MAX_SEGMENTS = 16
# The interpreter (TRITON_INTERPRET=1, how the tests run on CPU) multiplies the raw bits of bfloat16
# operands in tl.dot (triton-lang/triton#11584), so there the dots take bfloat16 operands as fp32.
# Triton picks interpreted or compiled when `@triton.jit` runs, so read the mode at import too.
_INTERPRETED = triton.knobs.runtime.interpret
_DOT_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_kv_heads,
    stride_key_tok,
    stride_key_head,
    stride_value_tok,
    stride_value_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    NUM_KV_HEADS_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok)
    if slot < 0:  # padding token: nothing to write
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, NUM_KV_HEADS_P)
    dims = tl.arange(0, HEAD_DIM_P)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :]

    key = tl.load(
        key_ptr + tok * stride_key_tok + heads[:, None] * stride_key_head + dims[None, :], mask=mask
    )
    k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
    tl.store(
        k_dst + heads[:, None] * stride_kc_head + dims[None, :],
        key.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )

    value = tl.load(
        value_ptr + tok * stride_value_tok + heads[:, None] * stride_value_head + dims[None, :], mask=mask
    )
    v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
    tl.store(
        v_dst + heads[:, None] * stride_vc_head + dims[None, :],
        value.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _find_sequence(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning flat q-block `q_block_id`: sequence i's q-blocks start at qsl[i] // BLOCK_Q + i."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    k,  # [HEAD_DIM_P, TILE_N]
    v,  # [TILE_N, HEAD_DIM_P]
    visible,  # [BLOCK_M, TILE_N]; read only when MASKED
    scale,
    softcap,
    MASKED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One K/V tile of flash attention: scores in the log2 domain (for exp2), running max and sum, and the
    accumulator rescaled to the new max."""
    s = tl.dot(q, k, input_precision=DOT_PRECISION)
    if USE_SOFTCAP:
        s = softcap * _tanh(s * scale / softcap) * _LOG2E
    else:
        s = s * (scale * _LOG2E)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]; written only when NUM_SEGMENTS == 1
    partial_out_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS, HEAD_DIM_P] fp32; only when NUM_SEGMENTS > 1
    partial_max_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32, log2 domain
    partial_sum_ptr,  # [num_tokens, num_heads, NUM_SEGMENTS] fp32
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    new_k_ptr,  # [num_tokens, num_kv_heads, head_dim]: this step's keys, read when NEW_KV
    new_v_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_seqs,
    num_heads,
    scale,
    softcap,
    sliding_window,
    stride_q_tok,
    stride_q_head,
    stride_out_tok,
    stride_out_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_nk_tok,
    stride_nk_head,
    stride_nv_tok,
    stride_nv_head,
    stride_bt_seq,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # BLOCK_M // GROUP_P
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    NEW_KV: tl.constexpr,  # this step's keys come from new_k/new_v, only earlier ones from the cache
    DOT_DTYPE: tl.constexpr,  # operand type of both tl.dot calls
    DOT_PRECISION: tl.constexpr,
):
    # The last q-blocks of a prefill see the most keys: start them first, so none is left running alone.
    q_block_id = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    seq = _find_sequence(query_start_loc_ptr, q_block_id, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_id - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:  # the grid is an upper bound on the number of q-blocks
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # tokens cached before this step's queries

    # Row r of the tile is query token q_block * BLOCK_Q + r // GROUP_P, head r % GROUP_P of the group.
    rows = tl.arange(0, BLOCK_M)
    q_tok = q_block * BLOCK_Q + rows // GROUP_P
    head_in_group = rows % GROUP_P
    head = kv_head * GROUP + head_in_group
    row_valid = (q_tok < q_len) & (head_in_group < GROUP)
    q_pos = context_len + q_tok
    tok = (q_start + q_tok).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_valid = dims < HEAD_DIM

    q = tl.load(
        q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    ).to(DOT_DTYPE)

    # Keys any row of this tile may see: [first_key, key_end); the cache serves [first_key, cached_end).
    key_end = tl.minimum(context_len + (q_block + 1) * BLOCK_Q, seq_len)
    if USE_WINDOW:
        first_key = tl.maximum(context_len + q_block * BLOCK_Q - sliding_window + 1, 0)
    else:
        first_key = 0
    cached_end = context_len if NEW_KV else key_end
    tile_begin = first_key // TILE_N
    tile_end = tl.cdiv(cached_end, TILE_N)
    if NUM_SEGMENTS > 1:
        tiles_per_segment = tl.cdiv(tile_end - tile_begin, NUM_SEGMENTS)
        segment_begin = tile_begin + segment * tiles_per_segment
        tile_end = tl.minimum(tile_end, segment_begin + tiles_per_segment)
        tile_begin = segment_begin

    m_i = tl.full([BLOCK_M], _NO_MAX, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for tile in range(tile_begin, tile_end):
        k_pos = tile * TILE_N + tl.arange(0, TILE_N)
        k_valid = k_pos < cached_end
        block = tl.load(block_table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        in_block = k_pos % BLOCK_SIZE
        k_off = block * stride_kc_block + in_block * stride_kc_slot + kv_head * stride_kc_head
        v_off = block * stride_vc_block + in_block * stride_vc_slot + kv_head * stride_vc_head
        k = tl.load(  # [HEAD_DIM_P, TILE_N], loaded transposed for the dot
            k_cache_ptr + k_off[None, :] + dims[:, None],
            mask=dim_valid[:, None] & k_valid[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        v = tl.load(
            v_cache_ptr + v_off[:, None] + dims[None, :],
            mask=k_valid[:, None] & dim_valid[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        visible = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k, v, visible, scale, softcap, True, USE_SOFTCAP, DOT_DTYPE, DOT_PRECISION
        )

    if NEW_KV:
        # This step's keys j = 0 .. new_end - 1 (at positions context_len + j), read where the projection
        # wrote them: no gather through the block table. Key j is visible to query token q_tok >= j, so
        # tiles wholly at or below this tile's first query token need no mask; the diagonal tiles do.
        new_end = tl.minimum((q_block + 1) * BLOCK_Q, q_len)
        first_row = q_block * BLOCK_Q
        if USE_WINDOW:
            new_begin = tl.maximum(first_key - context_len, 0) // TILE_N * TILE_N
            full_end = new_begin  # the window's edge crosses every tile: mask them all
        else:
            new_begin = 0
            full_end = (first_row + 1) // TILE_N * TILE_N
        for start in range(new_begin, full_end, TILE_N):
            j = start + tl.arange(0, TILE_N)
            k, v = _load_new_kv(
                new_k_ptr, new_v_ptr, q_start + j, kv_head, dims, j < new_end, dim_valid,
                stride_nk_tok, stride_nk_head, stride_nv_tok, stride_nv_head, k_cache_ptr, DOT_DTYPE,
            )
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k, v, 0, scale, softcap, False, USE_SOFTCAP, DOT_DTYPE, DOT_PRECISION
            )
        for start in range(full_end, new_end, TILE_N):
            j = start + tl.arange(0, TILE_N)
            j_valid = j < new_end
            k, v = _load_new_kv(
                new_k_ptr, new_v_ptr, q_start + j, kv_head, dims, j_valid, dim_valid,
                stride_nk_tok, stride_nk_head, stride_nv_tok, stride_nv_head, k_cache_ptr, DOT_DTYPE,
            )
            visible = j_valid[None, :] & (j[None, :] <= q_tok[:, None])
            if USE_WINDOW:
                visible = visible & (j[None, :] > q_tok[:, None] - sliding_window)
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k, v, visible, scale, softcap, True, USE_SOFTCAP, DOT_DTYPE, DOT_PRECISION
            )

    if NUM_SEGMENTS == 1:
        out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_out_tok + head[:, None] * stride_out_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        part = (tok * num_heads + head) * NUM_SEGMENTS + segment
        tl.store(partial_out_ptr + part[:, None] * HEAD_DIM_P + dims[None, :], acc, mask=row_valid[:, None])
        tl.store(partial_max_ptr + part, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + part, l_i, mask=row_valid)


@triton.jit
def _load_new_kv(
    new_k_ptr,
    new_v_ptr,
    tok,  # [TILE_N] flat token indices
    kv_head,
    dims,
    tok_valid,
    dim_valid,
    stride_nk_tok,
    stride_nk_head,
    stride_nv_tok,
    stride_nv_head,
    k_cache_ptr,
    DOT_DTYPE: tl.constexpr,
):
    """A tile of this step's keys ([HEAD_DIM_P, TILE_N], transposed for the dot) and values, rounded to the
    cache's type first, so they are the numbers a later step reads back from the cache."""
    tok = tok.to(tl.int64)
    cache_type = k_cache_ptr.dtype.element_ty
    k = tl.load(
        new_k_ptr + tok[None, :] * stride_nk_tok + kv_head * stride_nk_head + dims[:, None],
        mask=dim_valid[:, None] & tok_valid[None, :],
        other=0.0,
    )
    v = tl.load(
        new_v_ptr + tok[:, None] * stride_nv_tok + kv_head * stride_nv_head + dims[None, :],
        mask=tok_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    return k.to(cache_type).to(DOT_DTYPE), v.to(cache_type).to(DOT_DTYPE)


@triton.jit
def _merge_segments_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    num_heads,
    stride_out_tok,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first = (tok * num_heads + head) * NUM_SEGMENTS
    segments = tl.arange(0, NUM_SEGMENTS)
    dims = tl.arange(0, HEAD_DIM_P)
    seg_max = tl.load(partial_max_ptr + first + segments)
    seg_sum = tl.load(partial_sum_ptr + first + segments)
    seg_out = tl.load(partial_out_ptr + (first + segments)[:, None] * HEAD_DIM_P + dims[None, :])
    # Segments that saw no key hold max = _NO_MAX and sum = 0, so their weight is 0.
    weight = tl.exp2(seg_max - tl.max(seg_max, 0))
    out = tl.sum(seg_out * weight[:, None], 0) / tl.sum(seg_sum * weight, 0)
    tl.store(
        out_ptr + tok * stride_out_tok + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store key/value [N, Hkv, D] at cache slots slot_mapping[N] (block * block_size + offset); < 0 skips."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _check_last_dim_contiguous(key, value, k_cache, v_cache)
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        num_kv_heads,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=triton.next_power_of_2(head_dim),
        NUM_KV_HEADS_P=triton.next_power_of_2(num_kv_heads),
        BLOCK_SIZE=k_cache.shape[1],
    )


@dataclass(frozen=True)
class AttentionLaunch:
    """Tile sizes of one attention launch; `choose_launch` picks them, tests may force them."""

    block_m: int  # rows of the Q tile: query tokens x query heads of one KV head
    tile_n: int  # keys per inner-loop step
    num_segments: int  # > 1 splits each sequence's keys across programs (flash decoding)
    num_warps: int = 4
    num_stages: int = 2


def choose_launch(
    md: AttentionMetadata, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device
) -> AttentionLaunch:
    group_p = triton.next_power_of_2(num_heads // num_kv_heads)
    wide = head_dim > 128
    num_warps = 8 if wide else 4
    if not md.decode_only:
        if wide:
            return AttentionLaunch(block_m=max(64, group_p), tile_n=32, num_segments=1, num_warps=8)
        # the fastest of bench/attention_kernels.py --sweep on an H200 for 4096-token prefills (within 10%
        # of the fastest for batches of 1024-token ones): docs/benchmarks.md, "GPU"
        return AttentionLaunch(
            block_m=max(128, group_p), tile_n=64, num_segments=1, num_warps=8, num_stages=3
        )
    return AttentionLaunch(
        block_m=max(16, group_p),
        tile_n=32 if wide else 64,
        num_segments=_decode_segments(md.num_seqs * num_kv_heads, device),
        num_warps=num_warps,
    )


def _decode_segments(num_programs: int, device: torch.device) -> int:
    """Split the keys when one program per (sequence, KV head) leaves streaming multiprocessors idle.

    Depends on the batch shape only, not on context lengths, so a CUDA graph captured with short
    dummy contexts still splits when replayed on long ones.
    """
    sms = _multiprocessor_count(device)
    if num_programs >= sms:
        return 1
    return min(_MAX_SEGMENTS, triton.next_power_of_2(triton.cdiv(2 * sms, num_programs)))


@functools.cache
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of query [N, H, D] over each sequence's context in the paged cache -> [N, H, D].

    `new_kv`: this step's keys and values [N, Hkv, D] (already written to the cache); a prefill reads them
    from there instead of gathering them back out of the cache's blocks.
    """
    _, num_heads, head_dim = query.shape
    launch = choose_launch(md, num_heads, k_cache.shape[2], head_dim, query.device)
    return launch_paged_attention(query, k_cache, v_cache, md, scale, sliding_window, softcap, launch, new_kv)


def launch_paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
    launch: AttentionLaunch,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    _check_last_dim_contiguous(query, k_cache, v_cache, md.block_tables)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out

    group = num_heads // num_kv_heads
    group_p = triton.next_power_of_2(group)
    head_dim_p = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16
    block_m = max(launch.block_m, group_p)
    block_q = block_m // group_p
    segments = launch.num_segments
    # a decode reads its one new key from the cache like the rest; splitting keys (decode only) needs that too
    if new_kv is not None and segments == 1 and not md.decode_only:
        read_new_kv, (new_k, new_v) = True, new_kv
    else:
        read_new_kv, new_k, new_v = False, k_cache[0], v_cache[0]  # unread pointers
    _check_last_dim_contiguous(new_k, new_v)
    if segments > 1:
        partial_out = torch.empty(
            num_tokens, num_heads, segments, head_dim_p, dtype=torch.float32, device=query.device
        )
        partial_max = torch.empty(num_tokens, num_heads, segments, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty_like(partial_max)
    else:  # unused by the kernel; any tensor will do as a pointer
        partial_out = partial_max = partial_sum = out

    grid = (num_tokens // block_q + md.num_seqs, num_kv_heads, segments)
    _paged_attention_kernel[grid](
        out,
        partial_out,
        partial_max,
        partial_sum,
        query,
        k_cache,
        v_cache,
        new_k,
        new_v,
        md.block_tables,
        md.seq_lens,
        md.query_start_loc,
        md.num_seqs,
        num_heads,
        scale,
        softcap or 1.0,
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        new_k.stride(0),
        new_k.stride(1),
        new_v.stride(0),
        new_v.stride(1),
        md.block_tables.stride(0),
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
        GROUP=group,
        GROUP_P=group_p,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=launch.tile_n,
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=softcap is not None,
        NUM_SEGMENTS=segments,
        NEW_KV=read_new_kv,
        DOT_DTYPE=_dot_dtype(k_cache.dtype),
        # fp32 caches get exact fp32 products, not TF32
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    if segments > 1:
        _merge_segments_kernel[(num_tokens, num_heads)](
            out,
            partial_out,
            partial_max,
            partial_sum,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_P=head_dim_p,
            NUM_SEGMENTS=segments,
        )
    return out


def _dot_dtype(cache_dtype: torch.dtype) -> tl.dtype:
    if _INTERPRETED and cache_dtype == torch.bfloat16:
        return tl.float32
    return _DOT_DTYPE[cache_dtype]


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    # the kernels index the head dimension with unit stride, so its loads vectorize
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the last dimension must be contiguous, got strides {t.stride()}")
