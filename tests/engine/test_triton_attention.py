"""Triton attention kernels under TRITON_INTERPRET=1 (CPU) against torch SDPA on gathered, contiguous K/V.

The fixture runs a private, interpreted copy of the backend (see interpreted_triton.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from interpreted_triton import interpreted

from pagoda.attention.metadata import AttentionMetadata


@pytest.fixture(scope="module")
def tb() -> Iterator[ModuleType]:
    with interpreted("pagoda.attention.triton_backend") as module:
        yield module


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    md: AttentionMetadata
    block_lists: list[list[int]]


def make_batch(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> PagedBatch:
    """A flat batch whose sequences own shuffled cache blocks; every other slot holds random garbage."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3  # spare blocks that nobody owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_lists = []
    for n in blocks_needed:
        block_lists.append(order[:n])
        order = order[n:]
    width = max(blocks_needed)
    block_tables = torch.tensor([b + [0] * (width - len(b)) for b in block_lists], dtype=torch.int32)

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)

    slots = []
    for q_len, seq_len, blocks in zip(query_lens, seq_lens, block_lists, strict=True):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=query_start_loc,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
    )
    return PagedBatch(query, k_cache, v_cache, md, block_lists)


def reference_attention(
    batch: PagedBatch, scale: float, sliding_window: int | None, softcap: float | None
) -> torch.Tensor:
    """Per sequence: gather its context into contiguous K/V and run SDPA (explicit math with softcap)."""
    md = batch.md
    outputs = []
    num_heads = batch.query.shape[1]
    for i, (q_len, seq_len) in enumerate(zip(md.query_lens_cpu, md.seq_lens_cpu, strict=True)):
        blocks = torch.tensor(batch.block_lists[i])
        k = batch.k_cache[blocks].flatten(0, 1)[:seq_len].float()  # [seq_len, Hkv, D]
        v = batch.v_cache[blocks].flatten(0, 1)[:seq_len].float()
        start = int(md.query_start_loc[i])
        q = batch.query[start : start + q_len].float()

        q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
        k_pos = torch.arange(seq_len)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window

        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, tokens, D]
        if softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)
        else:
            group = num_heads // k.shape[0]
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
            logits = softcap * torch.tanh(q @ k.transpose(1, 2) * scale / softcap)
            out = logits.masked_fill(~visible, float("-inf")).softmax(-1) @ v
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_matches_reference(
    out: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    expected = reference_attention(batch, scale, sliding_window, softcap)
    tol = TOLERANCE[batch.query.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


# (query_lens, seq_lens): full prefill, decode, chunked prefill after cached tokens (prefix hit), and a
# one-token context.
MIXED = ([5, 1, 3, 1], [5, 9, 12, 1])
DECODE = ([1, 1, 1, 1], [1, 7, 20, 33])


@pytest.mark.parametrize(
    ("lens", "block_size", "num_heads", "num_kv_heads", "head_dim", "dtype"),
    [
        (MIXED, 4, 4, 2, 16, torch.float32),
        (MIXED, 16, 6, 2, 24, torch.float16),  # group of 3, non-power-of-two head dim
        (DECODE, 4, 4, 1, 32, torch.bfloat16),  # MQA
        (DECODE, 16, 2, 2, 8, torch.float32),  # MHA, head dim below the 16 tl.dot needs
        (MIXED, 16, 8, 2, 128, torch.float16),  # model-sized head dim
        (DECODE, 4, 4, 2, 64, torch.bfloat16),
    ],
    ids=[
        "mixed-gqa-fp32",
        "mixed-group3-fp16",
        "decode-mqa-bf16",
        "decode-mha-d8",
        "mixed-d128-fp16",
        "decode-d64-bf16",
    ],
)
def test_paged_attention_matches_sdpa(tb, lens, block_size, num_heads, num_kv_heads, head_dim, dtype):
    batch = make_batch(
        *lens,
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )
    scale = head_dim**-0.5
    out = tb.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, scale, None, None)
    assert_matches_reference(out, batch, scale)


@pytest.mark.parametrize(
    ("lens", "sliding_window", "softcap"),
    [(MIXED, 4, None), (MIXED, None, 2.0), (DECODE, 6, 2.0)],
    ids=["window", "softcap", "decode-window-softcap"],
)
def test_sliding_window_and_softcap(tb, lens, sliding_window, softcap):
    batch = make_batch(*lens, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    scale = 1.0  # large logits, so the cap at +-2 changes the result
    out = tb.paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.md, scale, sliding_window, softcap
    )
    assert_matches_reference(out, batch, scale, sliding_window, softcap)


@pytest.mark.parametrize(
    ("lens", "sliding_window"),
    [(DECODE, None), (DECODE, 9), (MIXED, None)],
    ids=["decode", "decode-window", "mixed"],
)
def test_split_keys_across_segments(tb, lens, sliding_window):
    # Segments of a few 16-key tiles each: some segments get no tile, some see only masked keys.
    batch = make_batch(*lens, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float16)
    launch = tb.AttentionLaunch(block_m=16, tile_n=16, num_segments=4)
    out = tb.launch_paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.md, 0.25, sliding_window, None, launch
    )
    assert_matches_reference(out, batch, 0.25, sliding_window)


def test_small_decode_batch_splits_keys_on_a_big_gpu(tb, monkeypatch):
    # 4 sequences x 2 KV heads would leave half of 16 multiprocessors idle: the public entry point
    # splits the keys into segments, more segments than these short contexts have tiles.
    monkeypatch.setattr(tb, "_multiprocessor_count", lambda device: 16)
    batch = make_batch(*DECODE, block_size=16, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float16)
    launch = tb.choose_launch(batch.md, 4, 2, 16, batch.query.device)
    assert launch.num_segments == 4
    out = tb.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None)
    assert_matches_reference(out, batch, 0.25)


def test_agrees_with_torch_backend(tb):
    # the engine picks a backend by device: both must give the same answer, window and softcap included
    from pagoda.attention import torch_backend

    batch = make_batch(*MIXED, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.md, 0.5, 6, 3.0)
    torch.testing.assert_close(tb.paged_attention(*args), torch_backend.paged_attention(*args))


def test_prefill_spans_several_query_blocks(tb):
    # block_m 16 with groups of 2 gives 8 query tokens per program: 19 queries take 3 q-blocks, and the
    # program grid's upper bound leaves programs with nothing to do.
    batch = make_batch(
        [19, 2, 9], [23, 2, 30], block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32
    )
    launch = tb.AttentionLaunch(block_m=16, tile_n=16, num_segments=1)
    out = tb.launch_paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.md, 0.25, 7, None, launch
    )
    assert_matches_reference(out, batch, 0.25, sliding_window=7)


def test_strided_query_from_fused_qkv(tb):
    batch = make_batch(*MIXED, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    qkv = torch.cat([batch.query, torch.randn(batch.query.shape[0], 4, 16)], dim=1)  # [N, 8, D]
    query = qkv[:, :4]
    assert not query.is_contiguous()
    out = tb.paged_attention(query, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None)
    assert_matches_reference(out, batch, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_direct_indexing(tb, dtype):
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_dim = 5, 4, 3, 12
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    # key and value as slices of one fused projection output: strided, not contiguous
    kv = torch.randn(6, 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    key, value = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    slot_mapping = torch.tensor([17, 3, -1, 0, 19, 8], dtype=torch.int64)  # -1: padding, skipped

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    keep = slot_mapping >= 0
    expected_k.view(-1, num_kv_heads, head_dim)[slot_mapping[keep]] = key[keep]
    expected_v.view(-1, num_kv_heads, head_dim)[slot_mapping[keep]] = value[keep]

    tb.write_kv(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


def test_write_then_attend_like_a_layer(tb):
    # A layer writes this step's K/V into the cache, then attends over cached + new tokens.
    batch = make_batch(*MIXED, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float16)
    new_k = torch.randn(batch.query.shape[0], 2, 16).half()
    new_v = torch.randn(batch.query.shape[0], 2, 16).half()
    tb.write_kv(new_k, new_v, batch.k_cache, batch.v_cache, batch.md.slot_mapping)
    assert torch.equal(batch.k_cache.view(-1, 2, 16)[batch.md.slot_mapping], new_k)
    out = tb.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None)
    assert_matches_reference(out, batch, 0.25)


def test_empty_batch(tb):
    batch = make_batch(*MIXED, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    empty = batch.query[:0]
    tb.write_kv(empty[:, :2], empty[:, :2], batch.k_cache, batch.v_cache, batch.md.slot_mapping[:0])
    assert tb.paged_attention(empty, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None).shape == (
        0,
        4,
        16,
    )


def test_rejects_heads_not_a_multiple_of_kv_heads(tb):
    batch = make_batch(*DECODE, block_size=4, num_heads=3, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        tb.paged_attention(batch.query, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None)


@pytest.mark.parametrize(
    ("lens", "sliding_window", "softcap"),
    [
        (([40, 1, 23, 5], [40, 9, 50, 5]), None, None),  # whole tiles below the diagonal, cached prefixes
        (([40, 1, 23, 5], [40, 9, 50, 5]), 11, None),
        (MIXED, None, 2.0),
    ],
    ids=["causal", "window", "softcap"],
)
def test_prefill_reads_this_steps_keys_from_the_projection(tb, lens, sliding_window, softcap):
    batch = make_batch(*lens, block_size=4, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float16)
    expected = reference_attention(batch, 0.25, sliding_window, softcap)
    slots = batch.md.slot_mapping
    flat_k, flat_v = batch.k_cache.view(-1, 2, 16), batch.v_cache.view(-1, 2, 16)
    new_kv = flat_k[slots].clone(), flat_v[slots].clone()
    # the kernel must take this step's keys from new_kv: their cache slots hold NaN now
    flat_k[slots] = float("nan")
    flat_v[slots] = float("nan")
    launch = tb.AttentionLaunch(block_m=16, tile_n=16, num_segments=1)
    out = tb.launch_paged_attention(
        batch.query, batch.k_cache, batch.v_cache, batch.md, 0.25, sliding_window, softcap, launch, new_kv
    )
    tol = TOLERANCE[torch.float16]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
