"""The torch paged-attention backend against torch SDPA (explicit math for soft-capping), contiguous K/V."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from pagoda.attention import get_backend, torch_backend
from pagoda.attention.metadata import AttentionMetadata


def reference_attention(
    query: torch.Tensor,  # [L, H, D]: the last L positions of the context
    keys: torch.Tensor,  # [S, Hkv, D]
    values: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    query_len, num_heads, _ = query.shape
    key_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    q = query.double().transpose(0, 1)  # [H, L, D]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    # query j sits at position key_len - query_len + j: it sees keys up to there (bottom-right causal)
    mask = torch.ones(query_len, key_len, dtype=torch.bool).tril(diagonal=key_len - query_len)
    if sliding_window is not None:
        mask &= torch.ones(query_len, key_len, dtype=torch.bool).triu(
            diagonal=key_len - query_len - sliding_window + 1
        )
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        scores = (q @ k.transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, -math.inf)
        out = scores.softmax(-1) @ v
    return out.transpose(0, 1).float()


def build_paged_batch(
    contexts: list[tuple[torch.Tensor, torch.Tensor]],
    query_lens: list[int],
    block_size: int,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Caches holding every context in shuffled (non-contiguous) blocks, plus the batch's metadata.

    The earlier part of each context is written first; the new tokens' K/V are written in one flat
    write_kv call, as the model does each step.
    """
    num_kv_heads, head_dim = contexts[0][0].shape[1:]
    blocks_needed = [-(-k.shape[0] // block_size) for k, _ in contexts]
    num_blocks = sum(blocks_needed) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables = [[free.pop() for _ in range(n)] for n in blocks_needed]

    def slots(table: list[int], start: int, stop: int) -> list[int]:
        return [table[p // block_size] * block_size + p % block_size for p in range(start, stop)]

    new_k, new_v, new_slots = [], [], []
    for (keys, values), table, query_len in zip(contexts, tables, query_lens):
        cached = keys.shape[0] - query_len
        torch_backend.write_kv(
            keys[:cached],
            values[:cached],
            k_cache,
            v_cache,
            torch.tensor(slots(table, 0, cached), dtype=torch.int64),
        )
        new_k.append(keys[cached:])
        new_v.append(values[cached:])
        new_slots += slots(table, cached, keys.shape[0])
    slot_mapping = torch.tensor(new_slots, dtype=torch.int64)
    torch_backend.write_kv(torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, slot_mapping)

    max_blocks = max(blocks_needed)
    seq_lens = [k.shape[0] for k, _ in contexts]
    md = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return k_cache, v_cache, md


CASES = [
    # (num_heads, num_kv_heads, head_dim, block_size, [(seq_len, query_len), ...], sliding_window, softcap)
    (4, 4, 16, 4, [(7, 7), (13, 13), (1, 1)], None, None),  # prefills only, MHA
    (8, 2, 32, 4, [(9, 1), (17, 1), (4, 1), (30, 1)], None, None),  # decodes only, GQA
    (4, 1, 16, 8, [(21, 21), (12, 1), (33, 5), (3, 1)], None, None),  # mixed, MQA, chunked prefill
    (6, 3, 8, 4, [(25, 25), (19, 1), (40, 7), (5, 5)], 6, None),  # sliding window
    (4, 2, 16, 4, [(15, 15), (22, 1), (18, 3)], None, 5.0),  # soft-capping
    (4, 2, 16, 16, [(50, 50), (37, 1), (64, 9), (2, 2)], 10, 2.0),  # window and soft-capping together
    (2, 2, 64, 1, [(6, 6), (5, 1)], 3, None),  # one-token blocks
    # decodes of very different lengths, interleaved with a prefill: split into several padded calls
    (4, 2, 16, 16, [(900, 1), (40, 40), (1200, 1), *[(n, 1) for n in range(2, 10)], (650, 1)], None, None),
    (4, 2, 16, 16, [(900, 1), *[(n, 1) for n in range(2, 10)], (1200, 1)], 100, 3.0),  # decodes, window
]


def test_decodes_of_very_different_lengths_split_into_calls() -> None:
    # the cases above exercise it: guard that they do split, and keep every sequence exactly once
    lengths = [900, 3, 1200, 7, 650, 2, 1100, 5, 4, 6, 8, 9]
    groups = torch_backend._length_groups(lengths)
    assert [sorted(lengths[i] for i in g) for g in groups] == [list(range(2, 10)), [650, 900, 1100, 1200]]
    assert torch_backend._length_groups([5, 9, 30, 17]) == [[0, 1, 2, 3]]  # short ones share one call


@pytest.mark.parametrize("case", CASES)
def test_paged_attention_matches_sdpa_on_contiguous_kv(case: tuple) -> None:
    num_heads, num_kv_heads, head_dim, block_size, shapes, sliding_window, softcap = case
    rng = random.Random(str(case))  # str seeds are stable across runs (unlike hash())
    torch.manual_seed(rng.randrange(1 << 30))
    contexts = [
        (torch.randn(seq_len, num_kv_heads, head_dim), torch.randn(seq_len, num_kv_heads, head_dim))
        for seq_len, _ in shapes
    ]
    query_lens = [q for _, q in shapes]
    queries = [torch.randn(q, num_heads, head_dim) * 2 for q in query_lens]
    k_cache, v_cache, md = build_paged_batch(contexts, query_lens, block_size, rng)
    scale = head_dim**-0.5

    out = torch_backend.paged_attention(
        torch.cat(queries), k_cache, v_cache, md, scale, sliding_window, softcap
    )

    expected = torch.cat(
        [reference_attention(q, k, v, scale, sliding_window, softcap) for q, (k, v) in zip(queries, contexts)]
    )
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_sliding_window_really_drops_old_keys() -> None:
    """Guards the reference as much as the backend: a window must change the result."""
    torch.manual_seed(0)
    keys, values = torch.randn(12, 1, 8), torch.randn(12, 1, 8)
    query = torch.randn(1, 1, 8)
    k_cache, v_cache, md = build_paged_batch([(keys, values)], [1], 4, random.Random(0))
    full = torch_backend.paged_attention(query, k_cache, v_cache, md, 0.3, None, None)
    windowed = torch_backend.paged_attention(query, k_cache, v_cache, md, 0.3, 3, None)
    torch.testing.assert_close(windowed, reference_attention(query, keys[-3:], values[-3:], 0.3, None, None))
    assert not torch.allclose(full, windowed)


def test_paged_attention_keeps_bfloat16_in_and_out() -> None:
    torch.manual_seed(1)
    contexts = [
        (torch.randn(10, 2, 16), torch.randn(10, 2, 16)),
        (torch.randn(6, 2, 16), torch.randn(6, 2, 16)),
    ]
    k_cache, v_cache, md = build_paged_batch(contexts, [10, 1], 4, random.Random(1))
    query = torch.randn(11, 4, 16)
    out = torch_backend.paged_attention(
        query.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), md, 0.25, None, None
    )
    expected = torch_backend.paged_attention(query, k_cache, v_cache, md, 0.25, None, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_write_kv_fills_slots_and_skips_negative_ones() -> None:
    k_cache = torch.zeros(3, 4, 2, 8)
    v_cache = torch.zeros(3, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    torch_backend.write_kv(key, value, k_cache, v_cache, torch.tensor([9, -1, 2]))
    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(v_cache[2, 1], value[0])
    assert torch.equal(k_cache[0, 2], key[2]) and torch.equal(v_cache[0, 2], value[2])
    assert int((k_cache != 0).any(dim=(-1, -2)).sum()) == 2  # the skipped token landed nowhere


def test_get_backend_picks_torch_on_cpu() -> None:
    assert get_backend(torch.device("cpu")) is torch_backend


def test_write_kv_checks_each_steps_slots() -> None:
    """The slot check is remembered for one slot tensor: a later step's, with a skipped slot, is checked."""
    k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    key = torch.randn(2, 1, 8)
    torch_backend.write_kv(key, key, k_cache, v_cache, torch.tensor([0, 1]))
    torch_backend.write_kv(key, key, k_cache, v_cache, torch.tensor([-1, 5]))
    assert torch.equal(k_cache[1, 1], key[1]) and int((k_cache != 0).any(dim=(-1, -2)).sum()) == 3


@pytest.mark.parametrize(("num_seqs", "threads_seen"), [(1, 1), (8, 2)])
def test_decode_attention_of_few_items_runs_on_one_thread(
    num_seqs: int, threads_seen: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SDPA over fewer (sequence, KV head) items than two per thread runs on one thread (waking the others
    costs more than they save), with the same result, and the thread count is restored after."""
    torch.manual_seed(num_seqs)
    contexts = [(torch.randn(n, 2, 16), torch.randn(n, 2, 16)) for n in range(20, 20 + num_seqs)]
    k_cache, v_cache, md = build_paged_batch(contexts, [1] * num_seqs, 4, random.Random(0))
    query = torch.randn(num_seqs, 4, 16)
    seen: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return sdpa(*args, **kwargs)

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
        out = torch_backend.paged_attention(query, k_cache, v_cache, md, 0.25)
        assert seen == [threads_seen] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    for i, (keys, values) in enumerate(contexts):
        expected = reference_attention(query[i : i + 1], keys, values, 0.25, None, None)
        torch.testing.assert_close(out[i : i + 1], expected)
