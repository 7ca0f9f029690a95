"""The sampler's hook: mask every constrained row of the batch's logits in one pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagoda.structured_outputs.backend import fill_bitmask

if TYPE_CHECKING:
    from pagoda.engine.sequence import Sequence

_BITS = torch.arange(32, dtype=torch.int32)


def apply_grammar_masks(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`logits` [B, V] with the tokens each constrained row's grammar forbids set to -inf (a new tensor
    when any row is constrained; the caller's is never modified). Unconstrained batches cost nothing."""
    rows = [row for row, seq in enumerate(seqs) if seq.matcher is not None]
    if not rows:
        return logits
    matchers = [seqs[row].matcher for row in rows]
    vocab_size = logits.shape[-1]
    bitmask = torch.empty(len(rows), (matchers[0].vocab_size + 31) // 32, dtype=torch.int32)
    fill_bitmask(matchers, bitmask)  # type: ignore[arg-type]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    allowed = ((bitmask[:, :, None] >> _BITS.to(logits.device)) & 1).bool().flatten(1)[:, :vocab_size]
    index = torch.tensor(rows, device=logits.device)
    masked = logits[index].masked_fill(~allowed, float("-inf"))
    return logits.index_put((index,), masked)
