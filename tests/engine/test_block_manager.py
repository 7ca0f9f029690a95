"""Block accounting and prefix caching, checked against an independent count of block owners."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine import block_manager as bm_module
from pagoda.engine.block_manager import BlockManager
from pagoda.engine.sequence import Sequence
from pagoda.sampling_params import SamplingParams

BS = 4


def seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams(), BS)


def admit(bm: BlockManager, s: Sequence) -> bool:
    cached = bm.cached_prefix(s)
    return bm.allocate(s, s.num_tokens - len(cached) * BS, cached)


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    owners = Counter(b for s in live for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == owners[block.block_id]
        assert (block.block_id in bm.free_block_ids) == (block.ref_count == 0)
    for h, block_id in bm.hash_to_block.items():
        assert bm.blocks[block_id].hash == h
    assert bm.usage == pytest.approx(len(owners) / bm.num_blocks)


def test_blocks_return_to_the_pool_when_a_sequence_ends() -> None:
    bm = BlockManager(8, BS)
    a, b = seq(list(range(10))), seq(list(range(100, 105)))
    assert admit(bm, a) and admit(bm, b)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert bm.num_free_blocks == 3
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_allocation_fails_without_side_effects_when_the_pool_is_short() -> None:
    bm = BlockManager(2, BS)
    s = seq(list(range(9)))  # needs 3 blocks
    assert not admit(bm, s)
    assert s.block_table == [] and bm.num_free_blocks == 2 and bm.prefix_queries == 0


def test_prefix_blocks_are_shared_and_the_last_token_is_always_computed() -> None:
    bm = BlockManager(16, BS)
    a = seq(list(range(11)))  # blocks [0..3] [4..7] full, [8..10] partial
    assert admit(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])
    cached = bm.cached_prefix(b)
    assert cached == a.block_table[:2]
    assert admit(bm, b)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    # a prompt that is exactly two cached blocks still recomputes its last token's block
    c = seq(list(range(8)))
    assert bm.cached_prefix(c) == a.block_table[:1]
    check_invariants(bm, [a, b])
    assert bm.prefix_queries == 11 + 11 and bm.prefix_hits == 8


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    bm = BlockManager(4, BS)
    a = seq(list(range(9)))
    assert admit(bm, a)
    first_blocks = a.block_table[:2]
    bm.free(a)
    assert bm.usage == 0.0  # cached-but-free blocks count as free
    again = seq(list(range(9)))
    assert bm.cached_prefix(again) == first_blocks
    # a different request that needs the whole pool evicts the cached blocks
    other = seq(list(range(200, 216)))
    assert admit(bm, other)
    assert bm.cached_prefix(seq(list(range(9)))) == []
    check_invariants(bm, [other])


def test_hash_collisions_do_not_share_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(8, BS)
    a = seq([1, 2, 3, 4, 5])
    assert admit(bm, a)
    assert bm.cached_prefix(seq([9, 9, 9, 9, 5])) == []


def test_prefix_caching_can_be_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = seq(list(range(9)))
    assert admit(bm, a)
    assert bm.hash_to_block == {}
    assert bm.cached_prefix(seq(list(range(9)))) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "grow", "free"]),
            st.lists(st.integers(0, 3), min_size=1, max_size=14),  # small vocab: many shared prefixes
            st.integers(0, 50),
        ),
        max_size=40,
    ),
    st.integers(1, 12),
)
def test_random_admissions_growth_and_frees_never_leak(ops: list, num_blocks: int) -> None:
    bm = BlockManager(num_blocks, BS)
    live: list[Sequence] = []
    for op, tokens, pick in ops:
        if op == "admit":
            s = seq(tokens)
            if admit(bm, s):
                s.num_computed_tokens = s.num_tokens
                live.append(s)
        elif live:
            s = live[pick % len(live)]
            if op == "grow":
                s.append_token(pick % 4)
                if bm.allocate(s, 1):
                    s.num_computed_tokens += 1
                else:
                    s.token_ids.pop()
            else:
                bm.free(s)
                live.remove(s)
        check_invariants(bm, live)
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == num_blocks and bm.usage == 0.0
