"""The sampler's hook: constrained rows of a batch sample only tokens their grammars allow.

A full bitmask row costs tenths of a millisecond (the grammar walks the whole vocabulary), while checking
one token costs about a microsecond. So, as llama.cpp does, rows whose draw is an exponential race over
the plain softmax (greedy, or temperature alone) sample first and check the token: if the grammar allows
it, it is exactly what sampling from the masked distribution would have picked (masking only removes
competitors of the winner), and only rejected rows are masked and drawn again, from the masked
distribution (again exact: a rejected first draw is independent of the redraw). Rows with top-k, top-p or
min-p are masked up front, since those filters act differently on the masked distribution. Masks are
filled on the CPU and applied to all the rows that need one in one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from pagoda.structured_outputs.backend import Matcher, fill_bitmask

if TYPE_CHECKING:
    from pagoda.engine.sequence import Sequence
    from pagoda.sampling_params import SamplingParams

_BITS = torch.arange(32, dtype=torch.int32)

Pick = Callable[[torch.Tensor, list["Sequence"]], torch.Tensor]


def sample_constrained(pick: Pick, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`pick(logits, seqs)` (one token per row), with every constrained row's token allowed by its grammar.
    Unconstrained batches cost nothing extra."""
    constrained = [row for row, seq in enumerate(seqs) if seq.matcher is not None]
    if not constrained:
        return pick(logits, seqs)
    upfront = [row for row in constrained if not _check_after_draw(seqs[row].params)]
    logits = apply_grammar_masks(logits, seqs, upfront)
    token_ids = pick(logits, seqs)
    tokens = token_ids.tolist()
    checked = set(constrained) - set(upfront)
    rejected = [row for row in sorted(checked) if not _matcher(seqs[row]).allows(tokens[row])]
    if rejected:
        index = torch.tensor(rejected, device=logits.device)
        subset = [seqs[row] for row in rejected]
        token_ids[index] = pick(apply_grammar_masks(logits[index], subset, range(len(rejected))), subset)
    return token_ids


def _matcher(seq: Sequence) -> Matcher:
    assert seq.matcher is not None
    return seq.matcher


def _check_after_draw(params: SamplingParams) -> bool:
    return params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0


def apply_grammar_masks(
    logits: torch.Tensor, seqs: list[Sequence], rows: list[int] | range
) -> torch.Tensor:
    """`logits` [B, V] with the tokens each listed row's grammar forbids set to -inf (a new tensor when any
    row is listed; the caller's is never modified)."""
    rows = list(rows)
    if not rows:
        return logits
    matchers = [_matcher(seqs[row]) for row in rows]
    vocab_size = logits.shape[-1]
    bitmask = torch.empty(len(rows), (matchers[0].vocab_size + 31) // 32, dtype=torch.int32)
    fill_bitmask(matchers, bitmask)
    bitmask = bitmask.to(logits.device, non_blocking=True)
    allowed = ((bitmask[:, :, None] >> _BITS.to(logits.device)) & 1).bool().flatten(1)[:, :vocab_size]
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed, float("-inf"))
    return logits.index_put((index,), masked)
