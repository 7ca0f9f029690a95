"""The tool-call formats: Hermes / Qwen (`<tool_call>` JSON), Llama 3.x JSON, Mistral `[TOOL_CALLS]`, and
the two that tool_choice "required" / a named function force through structured outputs."""

from __future__ import annotations

from typing import Any

from pagoda.entrypoints.tool_parsers.base import (
    ParsedOutput,
    ToolCall,
    ToolParser,
    held_back,
    parse_call_objects,
)


class HermesToolParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, once per call (Hermes, Qwen2.5,
    Qwen3); text before the first call is content."""

    start, end = "<tool_call>", "</tool_call>"

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        content, found, rest = text.partition(self.start)
        if not found:
            return ParsedOutput(text if finished else text[: len(text) - held_back(text, self.start)])
        calls = []
        for segment in rest.split(self.start):
            calls.extend(parse_call_objects(segment.split(self.end)[0]))
        return ParsedOutput(content, calls)


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1-3.3: the whole reply is `{"name": ..., "parameters": {...}}` (several joined by `;`),
    maybe after `<|python_tag|>`; a reply that does not open with `{` is content."""

    python_tag = "<|python_tag|>"

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        body = text.removeprefix(self.python_tag).lstrip()
        if not finished and (not body or self.python_tag.startswith(text)):
            return ParsedOutput("")  # too early to tell content from a call
        if not body.startswith("{"):
            return ParsedOutput(text)
        calls = parse_call_objects(body)
        return ParsedOutput(text if finished and not calls else "", calls)


class MistralToolParser(ToolParser):
    """`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v0.3 tokenizers) or
    `[TOOL_CALLS]name[ARGS]{...}` per call (v11+); text before the marker is content."""

    marker, args_marker = "[TOOL_CALLS]", "[ARGS]"
    bare_start = '[{"name"'  # the calls with the marker skipped as a special token

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        content, found, rest = text.partition(self.marker)
        if not found:
            stripped = text.lstrip()
            if stripped.startswith(self.bare_start):
                return ParsedOutput("", parse_call_objects(stripped))
            if not finished and stripped and self.bare_start.startswith(stripped):
                return ParsedOutput("")
            return ParsedOutput(text if finished else text[: len(text) - held_back(text, self.marker)])
        if rest.lstrip().startswith(("[", "{")):
            return ParsedOutput(content, parse_call_objects(rest))
        calls = []
        for segment in rest.split(self.marker):
            name, has_args, arguments = segment.partition(self.args_marker)
            if has_args:
                calls.append(ToolCall(name.strip(), arguments.strip(), complete=finished))
        return ParsedOutput(content, calls)


class ForcedCallsParser(ToolParser):
    """tool_choice "required": the grammar of `required_calls_schema` makes the whole reply a JSON array of
    `{"name": ..., "parameters": {...}}` objects."""

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        return ParsedOutput("", parse_call_objects(text))


class NamedCallParser(ToolParser):
    """tool_choice naming one function: the reply is that function's arguments, nothing else."""

    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        return ParsedOutput("", [ToolCall(self.name, text, complete=finished)])


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}


def required_calls_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of tool_choice "required": one or more calls (one when parallel_tool_calls is
    false), each naming one of the functions, with arguments that match its parameters; the name comes first
    so streaming can announce a call before its arguments."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "parameters": parameters_schema(f)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}

