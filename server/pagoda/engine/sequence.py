"""A sequence: one stream of tokens (prompt + completion) and the KV blocks that hold it."""

from __future__ import annotations

from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING

import torch

from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.engine.spec_decode.adaptive import DraftLength
    from pagoda.structured_outputs.backend import Matcher


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token list plus scheduling state; everything else is derived from these.

    `num_computed_tokens` counts tokens whose K/V are already in the cache. Each step the scheduler
    gives a sequence some of its uncomputed tokens; once all are computed, the model samples the next.
    A decode step is the case of exactly one uncomputed token (the one sampled last step).
    """

    _ids = count()

    def __init__(
        self,
        token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        request_id: str = "",
        index: int = 0,
        arrival_time: float = 0.0,
    ) -> None:
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index  # which of the request's n samples this is
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.block_size = block_size
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained prefix-cache keys of the full blocks hashed so far
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None
        # sampled-token logprobs: one dict {token_id: logprob} per generated token (when requested)
        self.logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[dict[int, float] | None] = []
        # a seeded request owns its generator, so its samples do not depend on the rest of the batch
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)
        # speculative decoding: this step's proposed tokens (not yet part of token_ids), the draft model's
        # distributions they were drawn from ([len, V]; None: point masses), how many to propose
        self.spec_token_ids: list[int] = []
        self.draft_probs: torch.Tensor | None = None
        self.draft_length: DraftLength | None = None
        # structured outputs: where the completion stands in its grammar. It follows `token_ids`, which a
        # preemption keeps, so a recomputed sequence resumes with its matcher where it was.
        self.matcher: Matcher | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks required to hold the first `num_tokens` tokens."""
        return (num_tokens + self.block_size - 1) // self.block_size

    def block_tokens(self, i: int) -> list[int]:
        """The tokens of logical block i."""
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.matcher is not None:
            self.matcher.consume(token_id)
