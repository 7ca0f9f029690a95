"""Continuous batching: every step, running sequences first, then admissions, under a token budget.

Each scheduled sequence gets some of its uncomputed tokens: a whole or partial prompt (chunked
prefill) or the one token it sampled last step (decode); all of them run in one flat forward.
When the KV pool runs dry the newest running sequence is preempted: its blocks go back to the pool
and it returns to the front of the queue, to be recomputed later (its prefix is usually still cached).
Admission is fair between requests: the next sequence admitted is the first waiting one of the request
with the fewest running, so one request's n samples cannot hold every batch slot while others wait.
With speculative decoding a decoding sequence also gets slots for the tokens it proposes (its lookahead),
which the same forward verifies, like a prompt chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from pagoda.engine.block_manager import BlockManager
from pagoda.engine.sequence import Sequence, SequenceStatus


class ScheduledSequence(NamedTuple):  # a named tuple: built for every running sequence every step, cheaply
    seq: Sequence
    num_new_tokens: int  # including the proposed tokens
    # whether this step computes the sequence's last token, so its logits give the next one; fixed when
    # scheduled, as the engine moves `seq.num_computed_tokens` on before it reads the sample
    samples: bool
    num_spec_tokens: int = 0  # proposed tokens to verify: the first ones of seq.spec_token_ids

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        """New tokens past the sequence's own are its proposals (speculative decoding)."""
        num_past = num_new_tokens - seq.num_uncomputed_tokens
        # tuple.__new__ directly: the named tuple's own __new__ is a Python function, twice as slow
        return tuple.__new__(cls, (seq, num_new_tokens, num_past >= 0, num_past if num_past > 0 else 0))


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        lookahead: Callable[[Sequence], int] | None = None,
        reserve_next_slot: bool = False,
    ) -> None:
        """`lookahead(seq)`: how many tokens a running sequence proposes this step (speculative decoding).
        `reserve_next_slot`: also hold the slot of each sequence's next token where the pool has room, for
        asynchronous scheduling, which launches the next decode before this step's tokens are seen."""
        self.block_manager = block_manager
        self.lookahead = lookahead or (lambda seq: 0)
        self.reserve_next_slot = reserve_next_slot
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens + self.lookahead(seq), budget)
            while not self._allocate(seq, num_new):
                victim = self.running[-1]  # newest first: it has the least work to redo
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSequence.of(seq, num_new))
                budget -= num_new
                i += 1

        # Admitting while preempting would only thrash the pool.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            cached = self.block_manager.cached_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            if not self._allocate(seq, num_new, cached):
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence.of(seq, num_new))
            budget -= num_new
        return scheduled

    def _allocate(self, seq: Sequence, num_new: int, cached: list[int] | None = None) -> bool:
        allocate = self.block_manager.allocate
        if self.reserve_next_slot and allocate(seq, num_new + 1, cached):
            return True
        return allocate(seq, num_new, cached)

    def _next_waiting(self) -> Sequence:
        """The first waiting sequence of the request with the fewest running sequences."""
        running: dict[str, int] = {}
        for seq in self.running:
            running[seq.request_id] = running.get(seq.request_id, 0) + 1
        best, fewest = self.waiting[0], running.get(self.waiting[0].request_id, 0)
        for seq in self.waiting:
            if fewest == 0:
                break  # no request has fewer than none
            count = running.get(seq.request_id, 0)
            if count < fewest:
                best, fewest = seq, count
        return best

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished or aborted) and return its blocks at once."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
