"""What a request asks of its output beyond sampling: structured outputs (both APIs) and tools (chat).

Every field that changes what the client gets back is resolved here into engine terms (a
`StructuredOutputsParams`, an output parser, the tools the chat template sees) or rejected with a 400 that
names it; none is dropped. Grammars are built before the request reaches the engine, so an invalid
schema, regex or grammar fails before any token is generated.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from pagoda.entrypoints.chat_output import ChatOutputParser
from pagoda.entrypoints.errors import bad_request
from pagoda.entrypoints.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
    SamplingRequest,
)
from pagoda.entrypoints.reasoning import REASONING_PARSERS
from pagoda.entrypoints.tool_parsers import PARSERS, ForcedCallsParser, NamedCallParser
from pagoda.entrypoints.tool_parsers.formats import parameters_schema, required_calls_schema
from pagoda.structured_outputs import StructuredOutputsParams

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
COMPILE_TIMEOUT_S = 10.0  # beyond llguidance's own fuel limits: never hold a request on a grammar longer


@dataclass(frozen=True)
class ToolOptions:
    """The server's flags, vLLM's names: --enable-auto-tool-choice, --tool-call-parser, --reasoning-parser."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


@dataclass
class Constraint:
    spec: StructuredOutputsParams
    param: str  # the request field it came from, named in errors


def structured_outputs_of(request: SamplingRequest) -> Constraint | None:
    """The one structured-output constraint a request gives (structured_outputs, a guided_* field or a
    non-text response_format); 400 when it gives several or a malformed one."""
    found: list[tuple[str, dict[str, Any]]] = []
    so = request.structured_outputs
    if so is not None:
        fields = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar}
        found.append(("structured_outputs", {**fields, "json_object": so.json_object}))
    for name in GUIDED:
        if getattr(request, name) is not None:
            found.append((name, {name.removeprefix("guided_"): getattr(request, name)}))
    response_format = getattr(request, "response_format", None)
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif response_format is not None and response_format.type == "json_schema":
        schema = response_format.json_schema.schema_
        found.append(("response_format", {"json": schema if schema is not None else {"type": "object"}}))
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_request(f"give at most one output constraint; got {names}", found[1][0])
    param, fields = found[0]
    try:
        return Constraint(StructuredOutputsParams(**fields), param)
    except ValueError as error:
        raise bad_request(f"{param}: {error}", param) from error


async def check_grammar(compiler: Any, constraint: Constraint) -> StructuredOutputsParams:
    """Build the constraint's grammar (cached by spec) off the event loop; 400 naming the field if it is
    invalid or takes too long."""
    try:
        await asyncio.to_thread(lambda: compiler.tokenizer)  # the one-off vocabulary conversion: not timed
        await asyncio.wait_for(asyncio.to_thread(compiler.compile, constraint.spec), COMPILE_TIMEOUT_S)
    except TimeoutError as error:
        raise bad_request(f"{constraint.param}: too complex to compile in time", constraint.param) from error
    except ValueError as error:  # GrammarError, or no tokenizer
        raise bad_request(f"invalid {constraint.param}: {error}", constraint.param) from error
    return constraint.spec


@dataclass
class ChatPlan:
    parser: ChatOutputParser
    constraint: Constraint | None
    tools: list[dict[str, Any]] | None  # for the chat template


def plan_chat(request: ChatCompletionRequest, options: ToolOptions) -> ChatPlan:
    """Tools, tool_choice and response_format into a grammar, an output parser and template tools."""
    if request.functions is not None or request.function_call is not None:
        param = "functions" if request.functions is not None else "function_call"
        raise bad_request(f"{param} is deprecated and not supported: use tools and tool_choice", param)
    reasoning = REASONING_PARSERS[options.reasoning_parser]() if options.reasoning_parser else None
    constraint = structured_outputs_of(request)
    functions = [tool.function.model_dump(exclude_none=True) for tool in request.tools or []]
    choice = request.tool_choice if request.tool_choice is not None else ("auto" if functions else "none")
    if not functions:
        if choice not in ("none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ChatPlan(ChatOutputParser(reasoning=reasoning), constraint, None)
    template_tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
    if choice == "none":
        return ChatPlan(ChatOutputParser(reasoning=reasoning), constraint, template_tools)
    if choice == "auto":
        if not (options.enable_auto_tool_choice and options.tool_call_parser):
            raise bad_request(
                '"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                "--tool-call-parser; or send tool_choice \"required\" or a named function",
                "tool_choice",
            )
        parser = ChatOutputParser(PARSERS[options.tool_call_parser](), reasoning)
        return ChatPlan(parser, constraint, template_tools)
    if constraint is not None:
        message = f"{constraint.param} cannot be combined with tool_choice {choice!r}"
        raise bad_request(message, constraint.param)
    if isinstance(choice, NamedToolChoice):
        function = next((f for f in functions if f["name"] == choice.function.name), None)
        if function is None:
            message = f"tool_choice names {choice.function.name!r}, which is not in tools"
            raise bad_request(message, "tool_choice")
        schema = parameters_schema(function)
        parser = ChatOutputParser(NamedCallParser(function["name"]), reasoning, calls_finish_reason="stop")
    else:  # "required"
        schema = required_calls_schema(functions, request.parallel_tool_calls)
        parser = ChatOutputParser(ForcedCallsParser(), reasoning)
    try:
        spec = StructuredOutputsParams(json=schema)
    except ValueError as error:
        raise bad_request(f"tools: {error}", "tools") from error
    return ChatPlan(parser, Constraint(spec, "tools"), template_tools)


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it: tool calls with their arguments as objects (templates `tojson`
    them), tool results with the id of the call they answer."""
    entry: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        entry["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _json_or_text(call.function.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.role == "tool" and message.name:
        entry["name"] = message.name
    return entry


def _json_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
