"""One chat choice's text as an assistant message: reasoning, content and tool calls, whole or as deltas.

Both paths parse the whole text so far with the same parsers; streaming sends what grew since the last
parse, so the deltas always add up to the final message (the official client's stream helpers rebuild it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from pagoda.entrypoints.reasoning import ReasoningParser
from pagoda.entrypoints.tool_parsers import ParsedOutput, ToolCall, ToolParser


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ChatOutputParser:
    tools: ToolParser | None = None
    reasoning: ReasoningParser | None = None
    calls_finish_reason: str = "tool_calls"  # a named tool_choice ends with "stop", as OpenAI's does

    @property
    def reads_special_tokens(self) -> bool:
        """The text must keep its special tokens (harmony's markers are special tokens)."""
        return self.reasoning is not None and self.reasoning.reads_special_tokens

    def split(self, text: str, finished: bool) -> tuple[str, str | None]:
        return self.reasoning.split(text, finished) if self.reasoning else ("", text)

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        reasoning, answer = self.split(text, finished)
        if answer is None:
            return ParsedOutput("", reasoning=reasoning)
        parsed = self.tools.parse(answer, finished) if self.tools else ParsedOutput(answer)
        parsed.reasoning = reasoning
        return parsed

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The final message fields and finish reason. Calls cut short (max_tokens) are not returned as
        calls: the whole answer comes back as content, so nothing that fails to parse looks like a call."""
        parsed = self.parse(text, finished=True)
        message: dict[str, Any] = {"content": parsed.content}
        if parsed.reasoning:
            message["reasoning_content"] = parsed.reasoning
        if parsed.calls and all(c.complete for c in parsed.calls) and finish_reason != "length":
            message["content"] = parsed.content.strip() or None
            message["tool_calls"] = [_call_dict(c, tool_call_id()) for c in parsed.calls]
            return message, self.calls_finish_reason if finish_reason == "stop" else finish_reason
        if parsed.calls:
            message["content"] = self.split(text, True)[1] or ""
        return message, finish_reason


@dataclass
class ChatDeltas:
    """Streaming state of one choice: how much of each part has been sent."""

    parser: ChatOutputParser
    sent_reasoning: int = 0
    sent_content: int = 0
    sent_calls: list[tuple[str, int]] = field(default_factory=list)  # (id, characters of arguments sent)

    def delta(self, text: str, finished: bool) -> dict[str, Any]:
        parsed = self.parser.parse(text, finished)
        delta: dict[str, Any] = {}
        if len(parsed.reasoning) > self.sent_reasoning:
            delta["reasoning_content"] = parsed.reasoning[self.sent_reasoning :]
            self.sent_reasoning = len(parsed.reasoning)
        if len(parsed.content) > self.sent_content:
            delta["content"] = parsed.content[self.sent_content :]
            self.sent_content = len(parsed.content)
        calls = [self._call_delta(i, call) for i, call in enumerate(parsed.calls)]
        calls = [c for c in calls if c is not None]
        if calls:
            delta["tool_calls"] = calls
        return delta

    def finish_reason(self, finish_reason: str | None) -> str | None:
        if self.sent_calls and finish_reason == "stop":
            return self.parser.calls_finish_reason
        return finish_reason

    def _call_delta(self, index: int, call: ToolCall) -> dict[str, Any] | None:
        if index == len(self.sent_calls):  # a new call: its id and name first
            self.sent_calls.append((tool_call_id(), 0))
            call_id, _ = self.sent_calls[index]
            entry: dict[str, Any] = {
                "index": index, "id": call_id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            self.sent_calls[index] = (call_id, len(call.arguments))
            return entry
        call_id, sent = self.sent_calls[index]
        if len(call.arguments) <= sent:
            return None
        self.sent_calls[index] = (call_id, len(call.arguments))
        return {"index": index, "function": {"arguments": call.arguments[sent:]}}


def _call_dict(call: ToolCall, call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
