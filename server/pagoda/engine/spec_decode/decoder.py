"""The engine's side of speculative decoding: how far each sequence looks ahead, proposals, counters."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from pagoda.engine.scheduler import ScheduledSequence
from pagoda.engine.sequence import Sequence
from pagoda.engine.spec_decode.adaptive import DraftLength
from pagoda.engine.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0


class Proposer(Protocol):
    def lookahead(self, seq: Sequence, k: int) -> int:
        """How many of up to k tokens `seq` proposes this step (0: none)."""
        ...

    def propose(self, batch: list[ScheduledSequence]) -> None:
        """Fill in the proposals of the scheduled batch (seq.spec_token_ids, seq.draft_probs)."""
        ...


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer
        # cumulative, as vLLM's vllm:spec_decode_* counters
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_per_pos = [0] * config.num_speculative_tokens
        self._logged = (time.monotonic(), 0, 0, 0)

    def lookahead(self, seq: Sequence) -> int:
        """The scheduler's hook: tokens a decoding sequence proposes, within its remaining max_tokens (the
        step also emits one token of the target's own)."""
        if seq.num_uncomputed_tokens != 1 or seq.matcher is not None:
            return 0  # a grammar-constrained sequence would need a mask per proposed position: not drafted
        if seq.draft_length is None:
            seq.draft_length = DraftLength(self.config.num_speculative_tokens)
        room = (seq.params.max_tokens or 0) - seq.num_completion_tokens - 1
        k = min(seq.draft_length.next(), room)
        return self.proposer.lookahead(seq, k) if k > 0 else 0

    def propose(self, batch: list[ScheduledSequence]) -> None:
        self.proposer.propose(batch)

    def record(self, seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """Count one verified draft and adapt the sequence's draft length to it."""
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            self.num_accepted_per_pos[pos] += 1
        if seq.draft_length is not None:
            seq.draft_length.update(num_proposed, num_accepted)
        self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        since, drafts, proposed, accepted = self._logged
        if now - since < LOG_INTERVAL_S:
            return
        drafts, proposed = self.num_drafts - drafts, self.num_draft_tokens - proposed
        accepted = self.num_accepted_tokens - accepted
        logger.info(
            "speculative decoding (%s): %d drafts, acceptance rate %.1f%% (%d of %d tokens), "
            "mean accepted length %.2f",
            self.config.method, drafts, 100.0 * accepted / max(proposed, 1), accepted, proposed,
            accepted / max(drafts, 1),
        )
        self._logged = (now, self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens)
