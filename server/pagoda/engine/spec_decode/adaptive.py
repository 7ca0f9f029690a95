"""Per-sequence draft length: speculate as far as it pays, and stop where it does not."""

from __future__ import annotations

from dataclasses import dataclass

MAX_PAUSE = 64  # steps: the longest a sequence goes without trying a proposal again


@dataclass
class DraftLength:
    """How many tokens a sequence proposes next.

    k grows by one after a fully accepted draft and shrinks by one after a rejection (the schedule of
    transformers' assisted generation). When a one-token draft is rejected outright, proposals cost more
    than they bring: the sequence pauses speculation, twice as long after each such failure, then tries a
    single token again. A workload with nothing to predict thus runs almost entirely unspeculated.
    """

    max_k: int
    k: int = 0
    pause: int = 0  # steps left without proposals
    backoff: int = 1  # the next pause's length

    def __post_init__(self) -> None:
        self.k = self.k or self.max_k

    def next(self) -> int:
        """The draft length for this step (0 while paused)."""
        if self.pause:
            self.pause -= 1
            return 0
        return self.k

    def update(self, num_proposed: int, num_accepted: int) -> None:
        if num_accepted == num_proposed:
            self.k = min(self.max_k, self.k + 1)
            self.backoff = 1
        elif num_accepted == 0 and num_proposed == 1:
            self.pause, self.backoff = self.backoff, min(2 * self.backoff, MAX_PAUSE)
        else:
            self.k = max(1, self.k - 1)
