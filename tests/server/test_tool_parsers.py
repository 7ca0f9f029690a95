"""Tool-call and reasoning parsers on hand-written model outputs in each family's format, whole and
streamed one character at a time (the deltas must add up to the whole parse), and chat templates of each
family rendering tools, assistant tool calls and tool results from the request's messages."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from pagoda.entrypoints.chat_output import ChatDeltas, ChatOutputParser
from pagoda.entrypoints.constraints import template_message
from pagoda.entrypoints.protocol import ChatMessage
from pagoda.entrypoints.reasoning import ThinkTagsParser
from pagoda.entrypoints.tool_parsers import PARSERS, ForcedCallsParser, NamedCallParser, ToolParser

WEATHER = ("get_weather", {"city": "Pa\"ris {x}", "days": [1, {"n": 2}]})
TIME = ("get_time", {})

CASES: list[tuple[str, str, str, list[tuple[str, dict]]]] = [
    (
        "hermes",
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Pa\\"ris {x}", "days": [1, {"n": 2}]}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me look.",
        [WEATHER, TIME],
    ),
    ("hermes", "No tools needed <tool_", "No tools needed <tool_", []),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa\\"ris {x}", '
        '"days": [1, {"n": 2}]}}; {"name": "get_time", "parameters": {}}',
        None,
        [WEATHER, TIME],
    ),
    ("llama3_json", "{ is how a brace looks", "{ is how a brace looks", []),
    ("llama3_json", "Plain answer.", "Plain answer.", []),
    (
        "mistral",
        'Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}", '
        '"days": [1, {"n": 2}]}}, {"name": "get_time", "arguments": {}}]',
        "Sure.",
        [WEATHER, TIME],
    ),
    ("mistral", '[TOOL_CALLS]get_time[ARGS]{}', None, [TIME]),
    ("mistral", '[{"name": "get_time", "arguments": {}}]', None, [TIME]),  # marker skipped as special
]


def streamed(parser: ChatOutputParser, text: str) -> dict[str, Any]:
    """Feed the text one character at a time and assemble the deltas as a client would."""
    deltas = ChatDeltas(parser)
    reasoning, content, calls = "", "", {}
    for end in range(1, len(text) + 1):
        delta = deltas.delta(text[:end], finished=end == len(text))
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": "", "arguments": "", "ids": []})
            if "id" in call:
                entry["ids"].append(call["id"])
                entry["name"] += call["function"]["name"]
            entry["arguments"] += call["function"].get("arguments", "")
    return {"reasoning": reasoning, "content": content, "calls": [calls[i] for i in sorted(calls)],
            "finish": deltas.finish_reason("stop")}


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
def test_parsers_read_each_family_whole_and_streamed(
    family: str, text: str, content: str | None, calls: list[tuple[str, dict]]
) -> None:
    parser = ChatOutputParser(PARSERS[family]())
    message, finish = parser.message(text, "stop")
    tool_calls = message.get("tool_calls", [])
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls]
    assert got == calls
    assert message["content"] == content
    assert finish == ("tool_calls" if calls else "stop")
    assert len({c["id"] for c in message.get("tool_calls", [])}) == len(calls)
    stream = streamed(parser, text)
    assert [(c["name"], json.loads(c["arguments"])) for c in stream["calls"]] == calls
    assert all(len(c["ids"]) == 1 for c in stream["calls"])  # id and name come once, first
    assert stream["content"].strip() == (content or "").strip()
    assert stream["finish"] == finish


def test_a_call_cut_short_is_content_not_a_call() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa'
    message, finish = ChatOutputParser(PARSERS["hermes"]()).message(text, "length")
    assert finish == "length" and "tool_calls" not in message and message["content"] == text


def test_forced_and_named_calls() -> None:
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
    for parser in (ChatOutputParser(ForcedCallsParser()),):
        message, finish = parser.message(text, "stop")
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
        assert finish == "tool_calls" and message["content"] is None
        assert [json.loads(c["arguments"]) for c in streamed(parser, text)["calls"]] == [{"city": "Oslo"}, {}]
    named = ChatOutputParser(NamedCallParser("get_weather"), calls_finish_reason="stop")
    message, finish = named.message('{"city": "Oslo"}', "stop")
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert finish == "stop"


@pytest.mark.parametrize("tools", [None, PARSERS["hermes"]()])
def test_think_tags_become_reasoning_content(tools: ToolParser | None) -> None:
    parser = ChatOutputParser(tools, ThinkTagsParser())
    text = "<think>\nThe user wants a <b>joke</b>.\n</think>\n\nWhy did the chicken..."
    message, _ = parser.message(text, "stop")
    assert message["reasoning_content"] == "\nThe user wants a <b>joke</b>.\n"
    assert message["content"] == "\n\nWhy did the chicken..."
    stream = streamed(parser, text)
    assert stream["reasoning"] == message["reasoning_content"] and stream["content"] == message["content"]
    plain, _ = parser.message("No thinking here.", "stop")  # enable_thinking: false
    assert plain == {"content": "No thinking here."}


# Simplified from each family's own template: where the tools, the assistant's calls and the results go.
TEMPLATES = {
    "hermes": (
        "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
        "<|im_end|>\n{% endif %}{% for m in messages %}{% if m.tool_calls %}<|im_start|>assistant\n"
        "{% for c in m.tool_calls %}<tool_call>\n"
        "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
        "{% endfor %}<|im_end|>\n{% elif m.role == 'tool' %}<|im_start|>user\n"
        "<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3_json": (
        "{% for m in messages %}{% if m.role == 'user' and tools and loop.last %}<|start_header_id|>user"
        "<|end_header_id|>\n\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}{{ m.content }}<|eot_id|>"
        "{% elif m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n{% for c in m.tool_calls %}"
        "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}{% endfor %}<|eot_id|>"
        "{% elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
        "{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "mistral": (
        "{% for m in messages %}{% if m.role == 'user' %}{% if tools and loop.last %}[AVAILABLE_TOOLS]"
        "{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]{% elif m.tool_calls %}"
        "[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list | tojson }}</s>"
        "{% elif m.role == 'tool' %}"
        "[TOOL_RESULTS]{\"call_id\": \"{{ m.tool_call_id }}\", \"content\": {{ m.content | tojson }}}"
        "[/TOOL_RESULTS]{% else %}{{ m.content }}</s>{% endif %}{% endfor %}"
    ),
}


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_family_templates_render_tools_calls_and_results(family: str) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
    from tiny_models import make_tiny_tokenizer

    tokenizer: PreTrainedTokenizerFast = make_tiny_tokenizer()
    tokenizer.chat_template = TEMPLATES[family]
    messages = [
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage.model_validate({
            "role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}],
        }),
        ChatMessage(role="tool", tool_call_id="call_1", content="-3 C"),
        ChatMessage(role="user", content="And tomorrow?"),
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    text = tokenizer.apply_chat_template(
        [template_message(m) for m in messages], tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert '"name": "get_weather"' in text  # the tool definitions and the call
    assert '{"city": "Oslo"}' in text  # arguments rendered as an object, not a JSON string in a string
    assert "-3 C" in text and "And tomorrow?" in text


def test_a_long_argument_is_scanned_by_the_regex_engine() -> None:
    # streaming parses the whole text again at every step, on the event loop: a Python loop over the
    # characters of a 5 MB argument took 0.3 s per step and choice
    text = '[{"name": "f", "parameters": ' + json.dumps({"city": "x" * 5_000_000})
    parser = ForcedCallsParser()
    start = time.process_time()
    (call,) = parser.parse(text, finished=False).calls
    assert not call.complete and call.arguments.startswith('{"city": "xxx')
    assert time.process_time() - start < 0.15
    (call,) = parser.parse(text + "}]", finished=True).calls
    assert call.complete and json.loads(call.arguments) == {"city": "x" * 5_000_000}
