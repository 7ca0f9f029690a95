"""Step inputs from scheduled sequences, without a model: against the per-token definitions they flatten."""

from __future__ import annotations

import random

from pagoda.engine.scheduler import ScheduledSequence
from pagoda.engine.sequence import Sequence
from pagoda.engine.step_inputs import PromptScoring, build_step_inputs, kv_slots
from pagoda.sampling_params import SamplingParams

BS = 4


def slot_of(block_table: list[int], position: int) -> int:
    """The definition: block `position // BS` of the table, offset `position % BS` in it."""
    return block_table[position // BS] * BS + position % BS


def test_kv_slots_match_the_per_token_definition() -> None:
    rng = random.Random(0)
    for _ in range(200):
        table = rng.sample(range(64), 8)
        start = rng.randrange(8 * BS)
        end = rng.randrange(start + 1, 8 * BS + 1)
        assert kv_slots(table, start, end, BS) == [slot_of(table, p) for p in range(start, end)]
        assert kv_slots(table, start, start + 1, BS) == [slot_of(table, start)]  # a decode step's one slot


def scheduled(seq: Sequence, num_new: int) -> ScheduledSequence:
    seq.block_table = list(range(100, 100 + seq.blocks_needed(seq.num_computed_tokens + num_new)))[::-1]
    return ScheduledSequence.of(seq, num_new)


def record(scorings: list[PromptScoring]) -> None:
    """What the model runner does with the scored rows: one entry per scored prompt position."""
    for scoring in scorings:
        if not scoring.seq.prompt_logprobs:
            scoring.seq.prompt_logprobs.append(None)
        scoring.seq.prompt_logprobs.extend({p + 1: 0.0} for p in range(scoring.lo, scoring.hi))


def test_chunked_prefill_scores_every_prompt_position_once_then_samples() -> None:
    prompt = list(range(10, 21))  # 11 tokens: positions 0..9 score tokens 1..10
    scoring = Sequence(prompt, SamplingParams(prompt_logprobs=1), BS)
    other = Sequence([7, 8, 9], SamplingParams(), BS)
    scored_positions: list[int] = []
    for chunk, other_new in ((5, 3), (4, 1), (2, 1)):
        batch = [scheduled(other, other_new), scheduled(scoring, chunk)]
        inputs, scorings = build_step_inputs(batch, BS)
        start, end = scoring.num_computed_tokens, scoring.num_computed_tokens + chunk
        # the flat batch: the other sequence's tokens, then this chunk's, at their positions and slots
        assert inputs.input_ids == other.token_ids[other.num_computed_tokens :] + prompt[start:end]
        assert inputs.positions[-chunk:] == list(range(start, end))
        assert inputs.slots[-chunk:] == [slot_of(scoring.block_table, p) for p in range(start, end)]
        assert inputs.query_lens == [other_new, chunk] and inputs.seq_lens == [other.num_tokens, end]
        # leading logit rows score prompt positions; then one row per sampling sequence, in batch order
        num_scored = sum(s.hi - s.lo for s in scorings)
        scored_positions += [inputs.positions[r] for r in inputs.logit_rows[:num_scored]]
        sampled = [inputs.positions[r] for r in inputs.logit_rows[num_scored:]]
        expected = [item.seq.num_tokens - 1 for item in batch if item.samples]
        assert sampled == expected
        record(scorings)
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.samples:
                item.seq.append_token(0)
    assert scored_positions == list(range(len(prompt) - 1))
    assert scoring.prompt_logprobs[0] is None and len(scoring.prompt_logprobs) == len(prompt)


def test_a_recomputed_prompt_is_not_scored_twice() -> None:
    seq = Sequence(list(range(9)), SamplingParams(prompt_logprobs=0), BS)
    _, scorings = build_step_inputs([scheduled(seq, 9)], BS)
    record(scorings)
    seq.num_computed_tokens = 9
    seq.append_token(1)
    seq.num_computed_tokens = 0  # preempted: the whole sequence runs again
    inputs, scorings = build_step_inputs([scheduled(seq, seq.num_tokens)], BS)
    assert sum(s.hi - s.lo for s in scorings) == 0
    assert inputs.logit_rows == [seq.num_tokens - 1]  # only the sample
