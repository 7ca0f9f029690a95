"""Reasoning parsers (vLLM's `--reasoning-parser`): the thinking part of a reply apart from the answer."""

from __future__ import annotations

import re

from pagoda.entrypoints.tool_parsers.base import held_back


class ReasoningParser:
    # the markers are special tokens, which the detokenizer drops unless told otherwise
    reads_special_tokens = False

    def split(self, text: str, finished: bool) -> tuple[str, str | None]:
        """(reasoning, answer) of the text so far; the answer is None while only reasoning has come (or
        while a marker that decides it may still be coming)."""
        raise NotImplementedError


class ThinkTagsParser(ReasoningParser):
    """`<think>reasoning</think>answer` (Qwen3, DeepSeek-R1 style). A reply that does not open with the
    start tag has no reasoning (Qwen3 with `enable_thinking: false` writes an empty pair into the prompt)."""

    start, end = "<think>", "</think>"

    def split(self, text: str, finished: bool) -> tuple[str, str | None]:
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


class HarmonyParser(ReasoningParser):
    """gpt-oss's harmony format. Its chat template ends the prompt with `<|start|>assistant`, so a reply is
    a run of messages, `{header}<|message|>{body}` ended by `<|end|>` (more follows), `<|return|>` or
    `<|call|>` (both stop generation); each later one opens with `<|start|>assistant`. The header names a
    channel (`<|channel|>analysis`) and, for a tool call, a recipient (` to=functions.get_weather`).

    `analysis` bodies are the reasoning; `final` bodies and `commentary` preambles (user-visible, no
    recipient) the answer. A message to a recipient is a tool call that no parser here turns into
    `tool_calls` yet: it goes to the answer verbatim, header included, rather than being dropped. Several
    messages of one kind are joined by newlines. A reply that does not open with a header is all answer.
    """

    reads_special_tokens = True
    START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
    ENDS = ("<|end|>", "<|return|>", "<|call|>")
    _channel = re.compile(r"<\|channel\|>\s*(\w+)")
    _recipient = re.compile(r"\bto=([^\s<]+)")

    def split(self, text: str, finished: bool) -> tuple[str, str | None]:
        opening = text.lstrip()
        if not opening.startswith((self.CHANNEL, self.START, "to=")):
            if not finished and any(m.startswith(opening) for m in (self.CHANNEL, self.START, "to=")):
                return "", None
            return "", text
        reasoning: list[str] = []
        answer: list[str] = []
        for header, body in self._messages(text, finished):
            channel = self._channel.search(header)
            if self._recipient.search(header):
                answer.append(header + self.MESSAGE + body)
            elif channel is not None and channel.group(1) == "analysis":
                reasoning.append(body)
            else:
                answer.append(body)
        if not answer and not finished:
            return "\n".join(reasoning), None
        return "\n".join(reasoning), "\n".join(answer)

    def _messages(self, text: str, finished: bool) -> list[tuple[str, str]]:
        """(header, body) of each message whose header is complete; an open body without the tail that
        may be the start of an end marker."""
        messages, pos = [], 0
        while (head_end := text.find(self.MESSAGE, pos)) >= 0:
            header, body_start = text[pos:head_end], head_end + len(self.MESSAGE)
            ends = [(i, m) for m in self.ENDS if (i := text.find(m, body_start)) >= 0]
            if not ends:
                body = text[body_start:]
                if not finished:
                    body = body[: len(body) - max(held_back(body, m) for m in self.ENDS)]
                messages.append((header, body))
                break
            end, marker = min(ends)
            messages.append((header, text[body_start:end]))
            pos = end + len(marker)
        return messages


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "qwen3": ThinkTagsParser,
    "deepseek_r1": ThinkTagsParser,
    "openai_gptoss": HarmonyParser,
}
