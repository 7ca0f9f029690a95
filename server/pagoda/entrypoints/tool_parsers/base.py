"""What a parser returns, and the JSON scanning all formats share."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# the start of a call object whose name comes first: {"name": "f", "arguments": (or "parameters":)
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text; while streaming, a prefix of it
    complete: bool = True


@dataclass
class ParsedOutput:
    content: str  # text outside the calls (what may be streamed as content so far)
    calls: list[ToolCall] = field(default_factory=list)
    reasoning: str = ""


class ToolParser:
    """Splits a (partial) completion into content and tool calls."""

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        raise NotImplementedError


# a whole JSON string, or a bracket, or a quote that opens a string not closed yet
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]"]', re.DOTALL)


def json_value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array that opens at text[start], or None if it is not closed
    yet (strings and escapes respected). Streaming parses the whole text again at every step, so strings
    are skipped by the regex engine: a Python loop over the characters of a 100k-character argument took
    11 ms per step and choice, on the event loop."""
    depth = 0
    for match in _JSON_TOKENS.finditer(text, start):
        token = match.group()
        if token == '"':
            return None  # a string that is still open
        if token in "{[":
            depth += 1
        elif token in "}]":
            depth -= 1
            if depth == 0:
                return match.end()
    return None


def parse_call_objects(text: str) -> list[ToolCall]:
    """Calls from consecutive objects `{"name": ..., "arguments" | "parameters": {...}}` (any separators
    between them). The last may be partial: its name shows once written, its arguments as they grow."""
    calls: list[ToolCall] = []
    position = 0
    while (start := text.find("{", position)) != -1:
        end = json_value_end(text, start)
        if end is not None:
            call = _complete_call(text[start:end])
            if call is None:
                return calls  # not a call object: stop here rather than guess
            calls.append(call)
            position = end
            continue
        head = _CALL_HEAD.match(text, start)
        if head is not None:
            # only an object's text is streamed as it grows; it is the same text the complete call keeps
            arguments = text[head.end() :] if text.startswith("{", head.end()) else ""
            calls.append(ToolCall(json.loads(f'"{head.group(1)}"'), arguments, complete=False))
        break
    return calls


def _complete_call(text: str) -> ToolCall | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    head = _CALL_HEAD.match(text)
    if head is not None and text.startswith("{", head.end()):
        # the arguments as written, so the final text extends what streaming sent
        end = json_value_end(text, head.end())
        return ToolCall(value["name"], text[head.end() : end])
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        return ToolCall(value["name"], arguments)
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (not yet streamable)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
