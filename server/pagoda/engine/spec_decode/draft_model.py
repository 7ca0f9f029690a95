"""A draft model: a smaller model with the target's vocabulary proposes k tokens per decoding sequence.

It keeps its own paged KV pool with exactly the target's block count and shares the target's block
tables, so a token's draft K/V sits in the same slot as its target K/V. Each step it forwards the same
real tokens as the target (prompt chunks too, so its cache mirrors the target's, prefix-cache hits
included), then runs k single-token steps over its own proposals, the last one only to store the K/V of
the k-th draft: whatever the target accepts, the draft cache is valid wherever the target's is.
"""

from __future__ import annotations

import dataclasses

import torch

from pagoda.config import EngineConfig
from pagoda.engine.model_runner import ModelRunner
from pagoda.engine.scheduler import ScheduledSequence
from pagoda.engine.sequence import Sequence
from pagoda.engine.step_inputs import StepInputs, kv_slots
from pagoda.layers.sampler import argmax, exponential_race, warped_probs
from pagoda.loader import open_checkpoint
from pagoda.models.spec import ModelSpec


class DraftModelProposer:
    def __init__(
        self, config: EngineConfig, model: str, num_blocks: int, max_model_len: int, vocab_size: int
    ) -> None:
        checkpoint = open_checkpoint(model)
        spec = ModelSpec.from_hf_config(checkpoint.config)
        if spec.vocab_size != vocab_size:
            raise ValueError(
                f"speculative_config: the draft model's vocabulary ({spec.vocab_size}) differs from the "
                f"target's ({vocab_size})"
            )
        if spec.max_position_embeddings < max_model_len:
            raise ValueError(
                f"speculative_config: the draft model's context ({spec.max_position_embeddings}) is shorter "
                f"than max_model_len ({max_model_len})"
            )
        draft_config = dataclasses.replace(
            config, model=model, tokenizer=None, quantization=None, num_gpu_blocks_override=num_blocks,
            speculative_config=None, async_scheduling=False,
        )
        self.runner = ModelRunner(draft_config, checkpoint, max_model_len)

    def lookahead(self, seq: Sequence, k: int) -> int:
        return k  # the draft runs after scheduling, into the slots allocated for it

    @torch.inference_mode()
    def propose(self, batch: list[ScheduledSequence]) -> None:
        drafting = [item for item in batch if item.num_spec_tokens]
        logits = self.runner.run(self._mirror_inputs(batch))
        drafts: list[list[int]] = [[] for _ in drafting]
        probs: list[list[torch.Tensor]] = [[] for _ in drafting]
        for j in range(1, max((item.num_spec_tokens for item in drafting), default=0) + 1):
            # rows of `logits`: the items that propose a j-th token, in order
            wanting = [i for i, item in enumerate(drafting) if item.num_spec_tokens >= j]
            assert logits is not None
            tokens, dists = self._draw(logits.float(), [drafting[i].seq for i in wanting])
            inputs = StepInputs()
            for i, token, dist in zip(wanting, tokens, dists, strict=True):
                drafts[i].append(token)
                if dist is not None:
                    probs[i].append(dist)
                seq = drafting[i].seq
                position = seq.num_tokens - 1 + j
                _append(inputs, seq, [token], position)
                if drafting[i].num_spec_tokens > j:
                    inputs.logit_rows.append(len(inputs.input_ids) - 1)
            logits = self.runner.run(inputs)
        for item, tokens, dists in zip(drafting, drafts, probs, strict=True):
            item.seq.spec_token_ids = tokens
            item.seq.draft_probs = torch.stack(dists) if dists else None

    @staticmethod
    def _mirror_inputs(batch: list[ScheduledSequence]) -> StepInputs:
        """The target's real tokens of this step, with logits at the last one of each drafting sequence."""
        inputs = StepInputs()
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            num_real = item.num_new_tokens - item.num_spec_tokens
            _append(inputs, seq, seq.token_ids[start : start + num_real], start)
            if item.num_spec_tokens:
                inputs.logit_rows.append(len(inputs.input_ids) - 1)
        return inputs

    @staticmethod
    def _draw(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[torch.Tensor | None]]:
        """Greedy sequences take the draft's argmax (a point mass); sampled ones draw from the draft's
        distribution under their own temperature / top-k / top-p, which verification then needs."""
        tokens = argmax(logits).tolist()
        dists: list[torch.Tensor | None] = [None] * len(seqs)
        sampled = [row for row, seq in enumerate(seqs) if not seq.params.greedy]
        if sampled:
            probs = warped_probs(logits[sampled], [seqs[row].params for row in sampled])
            drawn = exponential_race(probs, [seqs[row].generator for row in sampled]).tolist()
            for n, row in enumerate(sampled):
                tokens[row], dists[row] = drawn[n], probs[n]
        return tokens, dists


def _append(inputs: StepInputs, seq: Sequence, token_ids: list[int], start: int) -> None:
    """Add one sequence's query of `token_ids` at positions start.. to a flat batch."""
    end = start + len(token_ids)
    inputs.input_ids.extend(token_ids)
    inputs.positions.extend(range(start, end))
    inputs.slots.extend(kv_slots(seq.block_table, start, end, seq.block_size))
    inputs.query_lens.append(len(token_ids))
    inputs.seq_lens.append(end)
    inputs.block_tables.append(seq.block_table)
