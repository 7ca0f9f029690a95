"""Verification: which proposed tokens the target keeps, so the output follows the target exactly.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft token d at position j is kept with
probability min(1, p_j(d) / q_j(d)), where p is the target's distribution (after the sequence's penalties,
temperature, top-k, top-p and min-p, as the sampler applies them) and q the draft's. At the first
rejection the token is drawn from the residual max(0, p_j - q_j), renormalised, and the rest is dropped;
if all k are kept, a bonus token is drawn from p_k. Each emitted token is then distributed exactly as p.
A prompt-lookup proposal is deterministic: q is a point mass, so d is kept with probability p_j(d) and the
residual is p_j without d. Greedy sequences keep the longest prefix of drafts equal to the argmax.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from pagoda.engine.sequence import Sequence
from pagoda.layers.sampler import Sampler, exponential_race, logprob_dicts, warped_probs
from pagoda.layers.sampler import argmax as row_argmax

if TYPE_CHECKING:
    from pagoda.engine.scheduler import ScheduledSequence

# per sampling sequence: the tokens it emits this step and their logprob dicts (None where not asked)
Emitted = tuple[list[int], list[dict[int, float] | None]]


def rejection_sample(
    target_probs: torch.Tensor,
    draft_token_ids: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens one sequence emits: the accepted drafts, then one token from the residual or bonus row.

    `target_probs` [k + 1, V]: row j is the target's distribution after the first j drafts; `draft_probs`
    [k, V] the draft's, or None for point masses on `draft_token_ids`.
    """
    k = len(draft_token_ids)
    num_accepted = k
    if k:
        device = target_probs.device
        ids = torch.tensor(draft_token_ids, device=device)[:, None]
        p = target_probs[:k].gather(1, ids).squeeze(1)
        q = torch.ones_like(p) if draft_probs is None else draft_probs.gather(1, ids).squeeze(1)
        uniform = torch.rand(k, generator=generator).to(device)
        rejected = (uniform * q >= p).nonzero()  # u < p / q keeps d with probability min(1, p / q)
        num_accepted = int(rejected[0]) if rejected.numel() else k
    if num_accepted == k:
        dist = target_probs[k]
    else:
        target = target_probs[num_accepted]
        if draft_probs is None:
            residual = target.clone()
            residual[draft_token_ids[num_accepted]] = 0.0
        else:
            residual = (target - draft_probs[num_accepted]).clamp_min_(0.0)
        # a rejection implies p < q somewhere, hence residual mass; rounding may still leave none
        dist = residual if float(residual.sum()) > 0.0 else target
    token = int(exponential_race(dist[None], [generator])[0])
    return draft_token_ids[:num_accepted] + [token]


def greedy_accept(draft_token_ids: list[int], target_token_ids: list[int]) -> list[int]:
    """The drafts up to the first that differs from the target's argmax, then the target's token there."""
    for j, draft in enumerate(draft_token_ids):
        if draft != target_token_ids[j]:
            return draft_token_ids[:j] + [target_token_ids[j]]
    return draft_token_ids + [target_token_ids[len(draft_token_ids)]]


def verify(sampler: Sampler, logits: torch.Tensor, items: list[ScheduledSequence]) -> list[Emitted]:
    """Emit each sampling sequence's tokens from its rows of `logits`: 1 + (number of drafts) rows each,
    the last row of every sequence without drafts being its one ordinary sample."""
    logits = logits.float()
    contexts = [ctx for item in items for ctx in _contexts(item)]  # one per row
    processed = sampler.penalised_logits(logits, contexts)
    greedy = [ctx.params.greedy for ctx in contexts]
    argmax = row_argmax(processed).tolist() if any(greedy) else []
    random_rows = [row for row, g in enumerate(greedy) if not g]
    probs = torch.empty(0)
    if random_rows:
        probs = processed.new_zeros(processed.shape)
        probs[random_rows] = warped_probs(processed[random_rows], [contexts[r].params for r in random_rows])
    emitted: list[Emitted] = []
    row = 0
    for item in items:
        seq = item.seq
        drafts = seq.spec_token_ids[: item.num_spec_tokens]
        rows = slice(row, row + len(drafts) + 1)
        if seq.params.greedy:
            tokens = greedy_accept(drafts, argmax[rows])
        else:
            tokens = rejection_sample(probs[rows], drafts, seq.draft_probs, seq.generator)
        emitted.append((tokens, _logprobs(logits[row : row + len(tokens)], tokens, seq)))
        row = rows.stop
    return emitted


def _contexts(item: ScheduledSequence) -> list[Sequence]:
    """The sequence as each of its rows sees it: row j follows the first j drafts, which penalties and
    min_tokens must count as generated (shallow copies: same params and generator)."""
    seq = item.seq
    drafts = seq.spec_token_ids[: item.num_spec_tokens]
    contexts = [seq]
    for j in range(1, len(drafts) + 1):
        view = copy.copy(seq)
        view.token_ids = seq.token_ids + drafts[:j]
        contexts.append(view)
    return contexts


def _logprobs(logits: torch.Tensor, tokens: list[int], seq: Sequence) -> list[dict[int, float] | None]:
    """Raw logprobs (the model's log-softmax) of the emitted tokens, as the sampler reports them."""
    if seq.params.logprobs is None:
        return [None] * len(tokens)
    ids = torch.tensor(tokens, device=logits.device)
    return list(logprob_dicts(logits, ids, seq.params.logprobs))
