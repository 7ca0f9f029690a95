"""Reasoning parsers (vLLM's `--reasoning-parser`): the thinking part of a reply apart from the answer."""

from __future__ import annotations

from pagoda.entrypoints.tool_parsers.base import held_back


class ThinkTagsParser:
    """`<think>reasoning</think>answer` (Qwen3, DeepSeek-R1 style). A reply that does not open with the
    start tag has no reasoning (Qwen3 with `enable_thinking: false` writes an empty pair into the prompt)."""

    start, end = "<think>", "</think>"

    def split(self, text: str, finished: bool) -> tuple[str, str | None]:
        """(reasoning, answer) of the text so far; the answer is None while the reasoning is still open
        (or while the start tag may still be coming)."""
        stripped = text.lstrip()
        if not stripped.startswith(self.start):
            if not finished and self.start.startswith(stripped):
                return "", None
            return "", text
        reasoning, closed, answer = stripped[len(self.start) :].partition(self.end)
        if closed:
            return reasoning, answer
        if finished:
            return reasoning, ""
        return reasoning[: len(reasoning) - held_back(reasoning, self.end)], None


REASONING_PARSERS: dict[str, type[ThinkTagsParser]] = {
    "qwen3": ThinkTagsParser,
    "deepseek_r1": ThinkTagsParser,
}
