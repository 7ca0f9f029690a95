"""`--speculative-config` / `speculative_config=`: vLLM's JSON dict, validated strictly."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """How sequences propose tokens for the target to verify.

    ngram: prompt lookup over the sequence's own prompt and output; draft_model: a smaller model with the
    target's vocabulary (`model`) runs `num_speculative_tokens` steps ahead on its own paged KV.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config: unknown method {self.method!r}; expected ngram or draft_model"
            )
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError("speculative_config: num_speculative_tokens must be an integer >= 1")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError("speculative_config: method ngram takes no model")
            # vLLM's defaults: one bound given sets the other; none given looks for 5-grams
            lo = self.prompt_lookup_min or self.prompt_lookup_max or 5
            hi = self.prompt_lookup_max or self.prompt_lookup_min or 5
            for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"speculative_config: {name} must be an integer >= 1")
            if lo > hi:
                raise ValueError("speculative_config: prompt_lookup_min must not exceed prompt_lookup_max")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        else:
            if not self.model:
                raise ValueError("speculative_config: method draft_model needs a model")
            if self.prompt_lookup_min is not None or self.prompt_lookup_max is not None:
                raise ValueError("speculative_config: prompt_lookup_min/max apply to method ngram only")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """A config from a dict or its JSON text (None: no speculation). Unknown keys are an error."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"speculative_config is not valid JSON: {error}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}")
        options = dict(value)
        if options.get("method") is None and options.get("model"):  # vLLM infers it from a model
            options["method"] = "draft_model"
        if "num_speculative_tokens" not in options:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        if "method" not in options:
            raise ValueError("speculative_config: method is required (ngram or draft_model)")
        return cls(**options)
