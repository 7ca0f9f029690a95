"""Batched sampling: token filters (logit_bias, allowed_token_ids, bad_words), penalties, min_tokens,
temperature, top-k / top-p / min-p, seeded draws, logprobs.

One vectorised pass serves the whole batch; a step that no row needs (a sort, the penalty scatter, the
noise) is skipped. The order is vLLM's: the token filters, repetition, frequency and presence penalties,
the min_tokens mask, then temperature, top-k, top-p, min-p and the draw; structured outputs keep
constrained rows to the tokens their grammars allow (`structured_outputs/bitmask.py`). Greedy rows take the
argmax of the penalised logits.

Sampling uses the exponential race: argmax(p / E) with E ~ Exponential(1) i.i.d. picks token i with
probability p_i. It needs no cumsum and lets a seeded row draw its noise from its own generator, so its
samples do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Any

import torch

from pagoda import cpu_extension
from pagoda.engine.sequence import Sequence
from pagoda.sampling_params import SamplingParams
from pagoda.structured_outputs.bitmask import sample_constrained

_NEUTRAL = SamplingParams()  # temperature 1, no top-k / top-p / min-p
NUCLEUS_CANDIDATES = 1024  # top-p looks for its nucleus among this many best tokens before sorting a row
ARGMAX_CHUNK = 128  # columns per chunk of a CPU argmax (vocabularies are multiples of it, almost all)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: {token_id: logprob} with the top-`logprobs` tokens (best first) and then the sampled token
    # if it was not among them; None where the row did not ask for logprobs
    logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """Pick one token for each row of `logits` [B, V]; row b belongs to seqs[b]."""
        token_ids = self.pick(logits, seqs)
        token_list = token_ids.tolist()
        return SamplerOutput(token_list, self._sampled_logprobs(logits, token_ids, token_list, seqs))

    @torch.inference_mode()
    def pick(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The tokens alone, left on the logits' device (`sample` without reading them or their logprobs)."""
        if logits.dtype != torch.float32 and all(_plain_greedy(seq) for seq in seqs):
            # each row's argmax, which the float32 cast (exact) would not change: read as the head wrote them
            return argmax(logits)
        return sample_constrained(self._pick, self.penalised_logits(logits.float(), seqs), seqs)

    def _pick(self, processed: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if all(seq.params.greedy for seq in seqs):
            return argmax(processed)
        return self._sample_random(processed, seqs)

    def penalised_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Logits after repetition / frequency / presence penalties and the min_tokens mask (a new tensor
        when any applies; the caller's tensor is never modified)."""
        logits = apply_token_filters(logits, seqs)
        params = [seq.params for seq in seqs]
        repetition = any(p.repetition_penalty != 1.0 for p in params)
        frequency_presence = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
        if repetition or frequency_presence:
            vocab_size = logits.shape[-1]
            # a spare column V absorbs the padding of the token lists (and out-of-vocab ids), as in HF
            padded = torch.nn.functional.pad(logits, (0, 1))
            if repetition:
                seen = [seq.token_ids if seq.params.repetition_penalty != 1.0 else [] for seq in seqs]
                penalty = _column([p.repetition_penalty for p in params], logits)
                apply_repetition_penalty_(padded, _padded_ids(seen, vocab_size, logits.device), penalty)
            if frequency_presence:
                generated = _padded_ids([seq.completion_token_ids for seq in seqs], vocab_size, logits.device)
                frequency = _column([p.frequency_penalty for p in params], logits)
                presence = _column([p.presence_penalty for p in params], logits)
                apply_frequency_presence_penalties_(padded, generated, frequency, presence)
            logits = padded[:, :vocab_size]
        blocked = [
            (row, token)
            for row, seq in enumerate(seqs)
            if seq.params.min_tokens  # most rows have none: skip the call
            for token in self._blocked_stop_tokens(seq)
        ]
        if blocked:
            row_token = torch.tensor(blocked, device=logits.device)
            minus_inf = torch.tensor(float("-inf"), device=logits.device)
            logits = logits.index_put((row_token[:, 0], row_token[:, 1]), minus_inf)
        return logits

    def _blocked_stop_tokens(self, seq: Sequence) -> list[int]:
        """Tokens that would end the sequence before it has its min_tokens (EOS unless ignore_eos)."""
        params = seq.params
        if seq.num_completion_tokens >= params.min_tokens:
            return []
        eos = [] if params.ignore_eos else self.eos_token_ids
        return sorted(set(eos) | set(params.stop_token_ids))

    def _sample_random(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        greedy = [seq.params.greedy for seq in seqs]
        greedy_tokens = argmax(logits) if any(greedy) else None
        # greedy rows ride along with neutral settings; their draw is replaced by the argmax below
        params = [_NEUTRAL if seq.params.greedy else seq.params for seq in seqs]
        generators = [None if seq.params.greedy else seq.generator for seq in seqs]
        token_ids = exponential_race(warped_probs(logits, params), generators)
        if greedy_tokens is not None:
            token_ids = torch.where(device_tensor(greedy, logits.device), greedy_tokens, token_ids)
        return token_ids

    @staticmethod
    @torch.inference_mode()
    def prompt_logprobs(logits: torch.Tensor, next_token_ids: list[int], k: int) -> list[dict[int, float]]:
        """Raw logprobs of the prompt: for position i, the logprob of the prompt token that follows it
        (next_token_ids[i]) plus the top-k tokens there. `logits` is [P, V], one row per position."""
        return logprob_dicts(logits, torch.tensor(next_token_ids, device=logits.device), k)

    @staticmethod
    def _sampled_logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, token_list: list[int], seqs: list[Sequence]
    ) -> list[dict[int, float] | None]:
        """Raw logprobs (the model's own log-softmax, before penalties and temperature) of the rows that
        asked for them."""
        wanted = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
        result: list[dict[int, float] | None] = [None] * len(seqs)
        if not wanted:
            return result
        rows = torch.tensor(wanted, device=logits.device)
        num_top = max(seqs[row].params.logprobs or 0 for row in wanted)
        dicts = logprob_dicts(logits[rows], token_ids[rows], num_top)
        for row, entry in zip(wanted, dicts, strict=True):
            k = seqs[row].params.logprobs or 0
            result[row] = _trim_top(entry, k, token_list[row])
        return result


def device_tensor(values: list[Any], device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.tensor(values)` on `device`, copied from pinned memory without waiting: a copy from pageable
    memory waits for the device's stream, which asynchronous scheduling keeps busy with the next step."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor if device.type == "cpu" else tensor.pin_memory().to(device, non_blocking=True)


def reads_only_its_logits(seq: Sequence) -> bool:
    """Whether the row's token needs nothing but its logits (and a draw): no penalties, bad words,
    min_tokens or grammar, which read the tokens before it, and no logprobs to report."""
    params = seq.params
    return (
        seq.matcher is None
        and params.logprobs is None
        and params.repetition_penalty == 1.0
        and params.frequency_penalty == 0.0
        and params.presence_penalty == 0.0
        and not params.bad_words_token_ids
        and not params.min_tokens
    )


def _plain_greedy(seq: Sequence) -> bool:
    """Whether the row's token is the argmax of its raw logits."""
    params = seq.params
    filtered = params.logit_bias or params.allowed_token_ids
    return params.greedy and not filtered and reads_only_its_logits(seq)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax of `x` [B, V]: the first index of its maximum, a NaN counting as the largest,
    exactly as `torch.argmax`. On the CPU torch's argmax is a scalar loop (7.8 ms for 32 rows of 49k
    logits): the C++ operator reads each row once (0.34 ms); without it, the first 128-column chunk holding
    the row's maximum is found from the chunks' maxima, then the column within it (0.5-0.7 ms)."""
    rows, cols = x.shape
    if x.device.type != "cpu" or not x.is_contiguous():
        return x.argmax(dim=-1)
    if cpu_extension.available() and x.dtype in (torch.float32, torch.bfloat16) and cols:
        return torch.ops.pagoda.argmax_rows(x)
    if cols % ARGMAX_CHUNK:
        return x.argmax(dim=-1)
    chunk = x.view(rows, cols // ARGMAX_CHUNK, ARGMAX_CHUNK).amax(dim=-1).argmax(dim=-1)
    columns = chunk[:, None] * ARGMAX_CHUNK + torch.arange(ARGMAX_CHUNK)
    return chunk * ARGMAX_CHUNK + x.gather(1, columns).argmax(dim=-1)


def apply_token_filters(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logit_bias added, tokens outside allowed_token_ids and the last token of a bad word whose prefix
    the completion ends with masked (vLLM's semantics). The caller's tensor is untouched; rows without
    filters cost nothing, rows with them a few tensor operations each, whatever their lists' lengths."""
    filtered: list[tuple[int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = []
    masked: list[tuple[int, int]] = []
    for row, seq in enumerate(seqs):
        params = seq.params
        if not (params.logit_bias or params.allowed_token_ids or params.bad_words_token_ids):
            continue  # most rows: nothing to filter
        if params.logit_bias or params.allowed_token_ids:
            filtered.append((row, *params.filter_tensors))
        completion = seq.completion_token_ids if params.bad_words_token_ids else []
        for word in params.bad_words_token_ids:
            prefix = word[:-1]
            if len(prefix) <= len(completion) and completion[len(completion) - len(prefix) :] == prefix:
                masked.append((row, word[-1]))
    if not (filtered or masked):
        return logits
    logits = logits.clone()
    device = logits.device
    for row, allowed, bias_ids, bias_values in filtered:
        if allowed is not None:
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
            keep[allowed.to(device)] = True
            logits[row].masked_fill_(~keep, float("-inf"))
        if bias_ids is not None and bias_values is not None:
            logits[row].index_add_(0, bias_ids.to(device), bias_values.to(device, logits.dtype))
    if masked:
        row_token = torch.tensor(masked, device=device)
        logits[row_token[:, 0], row_token[:, 1]] = float("-inf")
    return logits


def logprob_dicts(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[dict[int, float]]:
    """Per row: the top-k tokens by logprob (best first), then `token_ids[row]` if not among them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids.long()[:, None]).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1)
    dicts = []
    rows = zip(token_ids.tolist(), chosen, top_ids.tolist(), top_values.tolist(), strict=True)
    for token, value, ids, values in rows:
        entry = dict(zip(ids, values, strict=True))
        entry.setdefault(token, value)
        dicts.append(entry)
    return dicts


def _trim_top(entry: dict[int, float], k: int, token: int) -> dict[int, float]:
    """Cut a dict built for the batch's largest k down to this row's k (plus its sampled token)."""
    trimmed = dict(list(entry.items())[:k])
    trimmed.setdefault(token, entry[token])
    return trimmed


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """A per-row parameter as a [B, 1] column on the logits' device."""
    return device_tensor(values, like.device, like.dtype)[:, None]


def _padded_ids(token_lists: SequenceOf[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Token lists as one [B, L] tensor, padded (and out-of-vocab ids clamped) to the spare column V."""
    width = max((len(ids) for ids in token_lists), default=0)
    rows = [ids + [vocab_size] * (width - len(ids)) for ids in token_lists]
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(token_lists), width)
    return ids.clamp_(max=vocab_size).to(device, non_blocking=True)


def apply_repetition_penalty_(logits: torch.Tensor, token_ids: torch.Tensor, penalty: torch.Tensor) -> None:
    """CTRL / HF repetition penalty, in place, on each row's tokens: positive logits are divided by the
    penalty, negative ones multiplied. Only the listed entries are touched (a repeated id writes the same
    value each time)."""
    seen = logits.gather(1, token_ids)
    logits.scatter_(1, token_ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def apply_frequency_presence_penalties_(
    logits: torch.Tensor, token_ids: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> None:
    """OpenAI's formula, in place: logit - count * frequency_penalty - (count > 0) * presence_penalty."""
    logits.scatter_add_(1, token_ids, (-frequency).expand(token_ids.shape))  # once per occurrence
    seen = logits.gather(1, token_ids)
    logits.scatter_(1, token_ids, seen - presence)  # once per distinct token


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask tokens outside each row's top-k (0 = off), then outside the nucleus top-p (1.0 = off) of what
    is left, like HF's TopKLogitsWarper and TopPLogitsWarper in a row. Rows that use neither are not touched.
    """
    rows = [row for row, (k, p) in enumerate(zip(top_k, top_p, strict=True)) if k > 0 or p < 1.0]
    if not rows:
        return logits
    vocab_size = logits.shape[-1]
    index = device_tensor(rows, logits.device)
    row_k = [min(top_k[r] or vocab_size, vocab_size) for r in rows]
    k = device_tensor(row_k, logits.device)
    subset = logits[index]
    if all(top_p[r] >= 1.0 for r in rows):
        subset = _top_k(subset, k, max(row_k))
    else:
        p = device_tensor([top_p[r] for r in rows], logits.device, logits.dtype)
        largest_k = max((kk for kk in row_k if kk < vocab_size), default=0)
        subset = _top_k_top_p(subset, k, p, min(max(NUCLEUS_CANDIDATES, largest_k), vocab_size))
    if len(rows) == logits.shape[0]:
        return subset
    logits = logits.clone()
    logits[index] = subset
    return logits


def _top_k(logits: torch.Tensor, k: torch.Tensor, largest_k: int) -> torch.Tensor:
    """Keep each row's k best tokens (and any tied with the k-th), from one `topk` up to the largest k."""
    kth = logits.topk(largest_k, dim=-1).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill_(logits < kth, float("-inf"))


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor, candidates: int) -> torch.Tensor:
    """Top-k then top-p, looking for each row's nucleus among its `candidates` best tokens only.

    A full sort of a large vocabulary is slow (about a second for 64 x 49k logits on one CPU core), and a
    language model's nucleus almost always lies among its first thousand tokens; rows where it does not
    (their candidates hold less than p of the mass) fall back to the full sort.
    """
    vocab_size = logits.shape[-1]
    if candidates == vocab_size:
        return _top_k_top_p_sorted(logits, k, p)
    values, _ = logits.topk(candidates, dim=-1)  # best first
    positions = torch.arange(candidates, device=logits.device)
    values.masked_fill_(positions >= k[:, None], float("-inf"))
    # top-p sees the distribution renormalised over the top-k tokens, or over the whole row without top-k
    normaliser = torch.where(k < vocab_size, values.logsumexp(dim=-1), logits.logsumexp(dim=-1))
    probs = (values - normaliser[:, None]).exp_()
    cumulative = probs.cumsum(dim=-1)
    # a token stays while the mass of the better tokens before it is still short of p
    keep = (cumulative - probs < p[:, None]) & (positions < k[:, None])
    keep[:, 0] = True
    threshold = values.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    filtered = logits.masked_fill(logits < threshold, float("-inf"))
    missed = (cumulative[:, -1] < p).nonzero().squeeze(1)
    if missed.numel():
        filtered[missed] = _top_k_top_p_sorted(logits[missed], k[missed], p[missed])
    return filtered


def _top_k_top_p_sorted(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p over one ascending sort of the whole rows (vLLM's and HF's formulation)."""
    vocab_size = logits.shape[-1]
    ascending, order = logits.sort(dim=-1)
    kth = ascending.gather(1, (vocab_size - k)[:, None])
    ascending.masked_fill_(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum_(dim=-1)
    outside_nucleus = cumulative <= 1.0 - p[:, None]
    outside_nucleus[:, -1] = False  # the most likely token always stays
    ascending.masked_fill_(outside_nucleus, float("-inf"))
    return logits.scatter_(1, order, ascending)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def warped_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row draws from: temperature, top-k, top-p and min-p, then softmax.
    (Not for greedy rows: temperature 0.)"""
    if any(p.temperature != 1.0 for p in params):
        logits = logits / _column([p.temperature for p in params], logits)
    logits = apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
    if any(p.min_p > 0.0 for p in params):
        logits = apply_min_p(logits, _column([p.min_p for p in params], logits))
    return logits.softmax(dim=-1)


def exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row from `probs` [B, V] as argmax(probs / Exponential(1) noise).

    Unseeded rows use the global RNG on the probs' device; a row with a (CPU) generator draws its noise
    there from that generator alone, and the seeded rows' noise crosses to the device in one copy.
    """
    uniform = torch.rand_like(probs)
    seeded = [row for row, g in enumerate(generators) if g is not None]
    if seeded:
        vocab_size = probs.shape[-1]
        own = torch.stack([torch.rand(vocab_size, generator=generators[row]) for row in seeded])
        uniform[torch.tensor(seeded, device=probs.device)] = own.to(probs.device)
    # -log(U) is Exponential(1), several times faster than exponential_() on CPU, and never 0 (U < 1), so
    # no 0/0 NaN can win the argmax
    return argmax(probs / uniform.log_().neg_())
