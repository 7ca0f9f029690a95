"""Prompt lookup: propose what followed the longest earlier occurrence of the sequence's last n tokens.

Input-grounded generation (summarising, rewriting, editing, code changes) copies long runs of its input,
so the continuation of an earlier match is often exactly what the model writes next; a miss costs one
vectorised scan of the token ids and no forward at all.
"""

from __future__ import annotations

import numpy as np

from pagoda.engine.scheduler import ScheduledSequence
from pagoda.engine.sequence import Sequence


def ngram_proposal(token_ids: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the longest (then latest) earlier match of the last n tokens of
    `token_ids`, for the largest n in [min_n, max_n] that matches anywhere; [] if none does."""
    tokens = np.asarray(token_ids)
    last = len(tokens) - 1
    if last < min_n or k < 1:
        return []
    # candidates end where the last token occurs earlier; extend each match backwards one token at a time
    ends = np.flatnonzero(tokens[:last] == tokens[last])
    length: np.ndarray = np.ones(len(ends), dtype=np.int64)
    alive: np.ndarray = np.ones(len(ends), dtype=bool)
    for m in range(1, min(max_n, last)):
        starts: np.ndarray = ends - m
        alive &= starts >= 0
        alive[alive] = tokens[starts[alive]] == tokens[last - m]
        if not alive.any():
            break
        length += alive
    if not len(ends) or length.max() < min_n:
        return []
    end = ends[np.flatnonzero(length == length.max())[-1]]
    return tokens[end + 1 : end + 1 + k].tolist()


class NgramProposer:
    """Proposals are made at scheduling time (they are free), so a miss schedules no lookahead at all."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def lookahead(self, seq: Sequence, k: int) -> int:
        seq.spec_token_ids = ngram_proposal(seq.token_ids, self.min_n, self.max_n, k)
        return len(seq.spec_token_ids)

    def propose(self, batch: list[ScheduledSequence]) -> None:
        """Nothing to do after scheduling: the proposals are the sequences' own tokens (point masses)."""
