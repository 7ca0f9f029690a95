"""Asynchronous scheduling of decode steps (vLLM's `--async-scheduling`): once a step's tokens are sampled on
the device, and before the host reads them, the runner launches the next decode step of the same sequences
with those tokens as its inputs. The GPU runs step N+1 while the host turns step N's tokens into outputs and
schedules step N+1, so it never waits for the host between decode steps (0.4 ms a token of an 8B model's
6.6 ms on an H100, docs/benchmarks.md).

The engine and the scheduler stay synchronous: the launched step is a guess that every sequence of the batch
decodes once more. When the scheduler's next batch is those sequences' decodes (all of them, or some: the
others finished, were aborted or were preempted), the runner takes the guessed step's tokens instead of
running the step again; any other batch (an admission, a prompt chunk) discards the guess. A discarded guess
costs a step of device time and wrote K/V only at each sequence's next position, in a block the sequence owns
and has not filled (so no other sequence shares it): a sequence that goes on rewrites that slot, and a freed
block's next owner writes every slot it reads.

A guess needs sampling that owes nothing to the token it has not seen (no penalties, bad words, min_tokens,
grammar or logprobs) nor to a seeded generator (a discarded guess would move the seed's stream), and the
next token's slot in a block the sequence holds: the scheduler reserves it a step ahead (`reserve_next_slot`)
where the pool has room. A sequence this step ends by length is left out of the guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagoda.engine.scheduler import ScheduledSequence
from pagoda.engine.sequence import Sequence
from pagoda.engine.spec_decode.rejection_sampler import Emitted
from pagoda.engine.step_inputs import StepInputs
from pagoda.layers.sampler import device_tensor, reads_only_its_logits

# a decode step's forward and sampling: (inputs, input token ids on the device, the rows' sequences) -> tokens
ForwardAndPick = Callable[[StepInputs, torch.Tensor, list[Sequence]], torch.Tensor]


@dataclass
class SampledStep:
    """One token per sequence, sampled on the device and on its way to the host."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # [n] on the device
    host: torch.Tensor  # [n], filled by a non-blocking copy
    copied: torch.cuda.Event | None  # None on the CPU, where the copy is done

    @classmethod
    def start(cls, seqs: list[Sequence], tokens: torch.Tensor) -> SampledStep:
        if tokens.device.type == "cpu":
            return cls(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(seqs, tokens, host, copied)

    def emitted(self) -> list[Emitted]:
        """The tokens, once on the host (waiting for this step's copy only, not for later launches)."""
        if self.copied is not None:
            self.copied.synchronize()
        return [([token], [None]) for token in self.host.tolist()]


@dataclass
class Guess:
    """A decode step launched before its batch was scheduled: sequence i's token at positions[i]."""

    step: SampledStep
    positions: list[int]

    def rows_of(self, batch: list[ScheduledSequence]) -> list[int] | None:
        """The guess's rows of `batch`, if the batch is decodes of its sequences at its positions, in its
        order; else None."""
        index = {seq.seq_id: row for row, seq in enumerate(self.step.seqs)}
        rows: list[int] = []
        for seq, num_new_tokens, _, _ in batch:
            row = index.get(seq.seq_id)
            if row is None or num_new_tokens != 1 or seq.num_computed_tokens != self.positions[row]:
                return None
            if rows and row <= rows[-1]:
                return None
            rows.append(row)
        return rows


class RunAhead:
    def __init__(self, forward_and_pick: ForwardAndPick, block_size: int) -> None:
        self.forward_and_pick = forward_and_pick
        self.block_size = block_size
        self.guess: Guess | None = None
        self.num_taken = 0  # guesses that became steps
        self.num_discarded = 0

    def take(self, batch: list[ScheduledSequence]) -> SampledStep | None:
        """The guessed step's tokens for `batch`, if the guess covers it; the guess is spent either way."""
        guess, self.guess = self.guess, None
        if guess is None:
            return None
        rows = guess.rows_of(batch)
        if rows is None:
            self.num_discarded += 1
            return None
        self.num_taken += 1
        if len(rows) == len(guess.positions):
            return guess.step
        index = device_tensor(rows, guess.step.tokens.device)
        return SampledStep.start([item.seq for item in batch], guess.step.tokens[index])

    def rows_to_guess(self, batch: list[ScheduledSequence]) -> list[int] | None:
        """The rows of `batch` whose next decode can be launched now: all but those this step ends by length;
        None if any row's next step needs the host (its sampling reads the last token, its slot is not
        reserved) or is no decode."""
        rows: list[int] = []
        for row, (seq, num_new_tokens, samples, num_spec_tokens) in enumerate(batch):
            if not samples or num_spec_tokens or not samples_blind(seq):
                return None
            assert seq.params.max_tokens is not None  # the engine sets it
            if seq.num_completion_tokens + 1 >= seq.params.max_tokens:
                continue
            if seq.num_computed_tokens + num_new_tokens >= len(seq.block_table) * self.block_size:
                return None  # the pool had no block to reserve: the next step allocates it
            rows.append(row)
        return rows or None

    def launch_next(self, batch: list[ScheduledSequence], sampled: SampledStep, rows: list[int]) -> None:
        """Launch the decode step of `batch`'s `rows` after this one, fed by this step's tokens."""
        seqs = [batch[row].seq for row in rows]
        positions = [seq.num_computed_tokens + batch[row].num_new_tokens for seq, row in zip(seqs, rows)]
        tokens = sampled.tokens
        if len(rows) < len(batch):
            tokens = tokens[device_tensor(rows, tokens.device)]
        block = self.block_size
        inputs = StepInputs(
            input_ids=[0] * len(seqs),  # on the device: `tokens`
            positions=positions,
            slots=[seq.block_table[p // block] * block + p % block for seq, p in zip(seqs, positions)],
            query_lens=[1] * len(seqs),
            seq_lens=[p + 1 for p in positions],
            block_tables=[seq.block_table for seq in seqs],
            logit_rows=list(range(len(seqs))),
        )
        self.guess = Guess(SampledStep.start(seqs, self.forward_and_pick(inputs, tokens, seqs)), positions)


def samples_blind(seq: Sequence) -> bool:
    """Whether `seq`'s next token can be sampled without the host seeing the one before it."""
    return seq.generator is None and reads_only_its_logits(seq)
