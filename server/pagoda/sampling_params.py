"""Per-request sampling parameters (vLLM's names and defaults)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from pagoda.structured_outputs.params import StructuredOutputsParams

if TYPE_CHECKING:
    import torch


class RequestOutputKind(IntEnum):
    """Which outputs a request gets (vLLM's values): a cumulative snapshot every step that extends it, or
    only the last, as `LLM.generate` asks for (it reads nothing else). vLLM's DELTA is not supported."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one is always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # OpenAI's logit_bias (token id -> bias in [-100, 100], added to the logits) and vLLM's token filters
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # sample only among these
    bad_words: list[str] = field(default_factory=list)  # never complete one (the engine tokenizes them)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (JSON schema, regex...)
    detokenize: bool = True  # False: token ids only, no text (and so no stop strings)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0.0, "temperature must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be -1 (off) or a positive integer"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be positive"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens must be <= max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "prompt_logprobs must be in [0, 20]"),
            (all(-100.0 <= b <= 100.0 for b in (self.logit_bias or {}).values()),
             "logit_bias values must be in [-100, 100]"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
             "allowed_token_ids must not be empty"),
            (self.detokenize or not self.stop, "stop strings need detokenize=True"),
            (self.output_kind != RequestOutputKind.DELTA, "output_kind DELTA is not supported"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def token_ids(self) -> list[int]:
        """Every token id these parameters name: the engine checks them against the vocabulary."""
        words = [t for ids in self.bad_words_token_ids for t in ids]
        return [*self.stop_token_ids, *(self.logit_bias or {}), *(self.allowed_token_ids or []), *words]

    @functools.cached_property
    def filter_tensors(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """allowed_token_ids, and logit_bias's ids and values, as CPU tensors built once: the sampler applies
        them at every step, and building them from the lists each time cost about a microsecond per id
        (a vocabulary-wide list: 0.2 s per sequence per step)."""
        import torch  # here, not at import: the HTTP side imports this module too

        allowed = torch.tensor(self.allowed_token_ids) if self.allowed_token_ids else None
        if not self.logit_bias:
            return allowed, None, None
        ids = torch.tensor(list(self.logit_bias))
        return allowed, ids, torch.tensor(list(self.logit_bias.values()), dtype=torch.float32)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
