"""What a request constrains its output to, in vLLM's names (`SamplingParams(structured_outputs=...)`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: a JSON schema (`json`, a dict or its text), any JSON object (`json_object`), a
    regular expression, a list of choices, or a grammar (Lark, or llama.cpp's GBNF)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, regex, choice, grammar or json_object"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.choice is not None and (
            not isinstance(self.choice, list | tuple) or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a list of strings")

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar is cached under: the kind and a canonical text of the spec."""
        value = getattr(self, self.kind)
        if self.kind == "json" and not isinstance(value, str):
            return ("json", json.dumps(value, sort_keys=True, separators=(",", ":")))
        if self.kind == "choice":
            return ("choice", json.dumps(list(value)))
        return (self.kind, str(value))
