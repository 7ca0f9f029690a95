"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, block tables, prefix caching.

Blocks live in one free pool ordered for LRU eviction. A full block is keyed by a chained hash of
(parent block's hash, its token ids), so one dict lookup per block walks a sequence's longest cached
prefix. A freed block keeps its hash and contents until the pool hands it out again: that is the
prefix cache. Cached-but-free blocks count as free in `usage`.
"""

from __future__ import annotations

from collections import OrderedDict

from pagoda.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()  # kept to rule out hash collisions


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache has no blocks: give it more memory")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # insertion order = eviction order: the front is reused first
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # tokens looked up, cumulative
        self.prefix_hits = 0  # tokens found, cumulative

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of a sequence that has no blocks yet.

        At least one token is always left to compute, since its logits are needed to sample.
        """
        # prompt logprobs need every prompt position's logits, so such a prompt is computed in full
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        hits: list[int] = []
        parent = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.block_tokens(i))
            parent = chain_hash(parent, tokens)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens (taking `cached` prefix blocks first).

        Returns False, changing nothing, when the free pool is too small.
        """
        if not cached and self._fits(seq, seq.num_computed_tokens + num_new_tokens):
            return True  # most decode steps: the last block has room, and no block fills up
        cached = cached or []
        num_computed = seq.num_computed_tokens + len(cached) * self.block_size
        num_needed = seq.blocks_needed(num_computed + num_new_tokens) - len(seq.block_table) - len(cached)
        num_revived = sum(1 for b in cached if self.blocks[b].ref_count == 0) if cached else 0
        if num_needed + num_revived > self.num_free_blocks:
            return False
        if not seq.block_table:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += len(cached) * self.block_size
            seq.num_cached_tokens = len(cached) * self.block_size
            seq.num_computed_tokens = num_computed
        for block_id in cached:
            self._take(block_id)
            seq.block_table.append(block_id)
        for _ in range(max(num_needed, 0)):
            block_id = next(iter(self.free_block_ids))
            self._take(block_id)
            self._forget(block_id)
            seq.block_table.append(block_id)
        # proposed tokens (past num_tokens) may be rejected: only real tokens key a block
        num_full = min(num_computed + num_new_tokens, seq.num_tokens) // self.block_size
        if self.enable_prefix_caching and num_full > len(seq.block_hashes):
            self._register_full_blocks(seq, num_full)
        return True

    def _fits(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the sequence's blocks hold its first `num_tokens` tokens already, with every block they
        fill with real tokens keyed (or nothing to key): then allocating changes nothing."""
        block_size = self.block_size
        if not seq.block_table or num_tokens > len(seq.block_table) * block_size:
            return False  # a new sequence's first allocation also counts its prefix-cache lookup
        return not self.enable_prefix_caching or min(num_tokens, seq.num_tokens) // block_size <= len(
            seq.block_hashes
        )

    def free_tail(self, seq: Sequence) -> None:
        """Return the blocks past the sequence's tokens: those allocated for rejected proposals.

        They were never keyed into the prefix cache, so they go first in line for reuse."""
        while len(seq.block_table) > seq.blocks_needed(seq.num_tokens):
            block_id = seq.block_table.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                self.free_block_ids.move_to_end(block_id, last=False)

    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks; the tail goes first in line for reuse, so prefixes live longest."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash is None:  # holds nothing reusable: hand it out first
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table.clear()

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _forget(self, block_id: int) -> None:
        """Evict a block from the prefix cache before it is overwritten."""
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash = None
        block.token_ids = ()

    def _register_full_blocks(self, seq: Sequence, num_full: int) -> None:
        """Key the first `num_full` blocks (full of real tokens), so later requests can share them."""
        hashes = seq.block_hashes
        for i in range(len(hashes), num_full):
            tokens = tuple(seq.block_tokens(i))
            hashes.append(chain_hash(hashes[-1] if hashes else None, tokens))
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and hashes[-1] not in self.hash_to_block:  # a twin may hold these tokens
                block.hash = hashes[-1]
                block.token_ids = tokens
                self.hash_to_block[block.hash] = block.block_id
