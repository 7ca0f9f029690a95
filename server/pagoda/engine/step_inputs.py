"""A scheduled batch turned into one step's flat inputs: token ids, positions, KV slots, and which rows'
logits the step needs (prompt positions to score, then per sampling sequence one row, plus one per
proposed token it has to verify under speculative decoding).

Pure Python over the scheduler's output, so it is tested without a model; the model runner sends the
result to the other tensor-parallel ranks and runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from pagoda.engine.scheduler import ScheduledSequence
from pagoda.engine.sequence import Sequence


@dataclass
class StepInputs:
    """One step's flat batch: all that a rank needs to run the forward (rank 0 sends it to the others)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    # rows of the flat batch whose logits the step needs: prompt positions to score, then sampled rows
    logit_rows: list[int] = field(default_factory=list)


@dataclass
class PromptScoring:
    """Prompt positions lo..hi-1 of `seq` to score this step: position p's logits score token p + 1."""

    seq: Sequence
    lo: int
    hi: int


def build_step_inputs(
    batch: list[ScheduledSequence], block_size: int
) -> tuple[StepInputs, list[PromptScoring]]:
    """The step's inputs, and the prompt scorings whose rows lead `logit_rows` (in that order)."""
    inputs = StepInputs()
    # the lists by local names: this loop runs for every scheduled sequence, every step
    input_ids, positions, slots, logit_rows = (inputs.input_ids, inputs.positions, inputs.slots,
                                               inputs.logit_rows)
    scorings: list[PromptScoring] = []
    sampled_rows: list[int] = []
    for item in batch:
        seq, num_new = item.seq, item.num_new_tokens
        start = seq.num_computed_tokens
        end = start + num_new
        row = len(input_ids)  # of position `start`
        if num_new == 1 and not item.num_spec_tokens:  # a decode step: most sequences of most steps
            input_ids.append(seq.token_ids[start])
            positions.append(start)
            slots.append(seq.block_table[start // block_size] * block_size + start % block_size)  # kv_slots'
        else:
            input_ids += seq.token_ids[start:end]
            if item.num_spec_tokens:
                input_ids += seq.spec_token_ids[: item.num_spec_tokens]  # proposals after real tokens
            positions += range(start, end)
            slots += kv_slots(seq.block_table, start, end, block_size)
        inputs.query_lens.append(num_new)
        inputs.seq_lens.append(end)
        inputs.block_tables.append(seq.block_table)
        scoring = prompt_scoring(item) if seq.params.prompt_logprobs is not None else None
        if scoring is not None:
            scorings.append(scoring)
            logit_rows += range(row + scoring.lo - start, row + scoring.hi - start)
        if item.samples:  # the last real token's row, then one per proposal to verify
            last = row + num_new - 1
            if item.num_spec_tokens:
                sampled_rows += range(last - item.num_spec_tokens, last + 1)
            else:
                sampled_rows.append(last)
    logit_rows += sampled_rows
    return inputs, scorings


def kv_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start..end-1, one contiguous range per block."""
    if end - start == 1:  # a decode step's one position
        return [(block_table[start // block_size] * block_size) + start % block_size]
    slots: list[int] = []
    for b in range(start // block_size, (end - 1) // block_size + 1):
        lo, hi = max(start, b * block_size), min(end, (b + 1) * block_size)
        base = (block_table[b] - b) * block_size
        slots.extend(range(base + lo, base + hi))
    return slots


def prompt_scoring(item: ScheduledSequence) -> PromptScoring | None:
    """For a sequence that asked for prompt logprobs, the prompt positions this step computes that score a
    next prompt token. A recomputed (preempted) prompt is not scored twice."""
    seq, start = item.seq, item.seq.num_computed_tokens
    if seq.params.prompt_logprobs is None or start >= seq.num_prompt_tokens:
        return None
    # prompt_logprobs[0] is the first token's None, so entries up to position len - 2 are scored
    lo = max(start, max(len(seq.prompt_logprobs), 1) - 1)
    hi = max(lo, min(start + item.num_new_tokens, seq.num_prompt_tokens - 1))
    return PromptScoring(seq, lo, hi)


def padded_tables(block_tables: list[list[int]], dtype: type[np.integer]) -> np.ndarray:
    """The block tables as one array [n, the longest table's length], zero-padded: filled by numpy from
    the concatenated tables, with no Python loop over the rows (hundreds of them in a large decode step)."""
    lengths = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
    width = int(lengths.max())
    tables: np.ndarray = np.zeros((len(block_tables), width), dtype=dtype)
    flat = np.fromiter(chain.from_iterable(block_tables), dtype=dtype, count=int(lengths.sum()))
    tables[np.arange(width) < lengths[:, None]] = flat  # a row-major mask: each row's first len entries
    return tables
