"""Structured outputs and tool calling through the official `openai` client against live servers.

The tiny random models only ever produce valid output because the grammar forces it, so every check here
(pydantic parsing, jsonschema, `re.fullmatch`, the client's own stream assembly) fails if a constraint is
dropped. A second tiny server uses a Qwen-style template and the hermes / qwen3 parsers, with a regex that
makes the random model write that family's format; the embedded SmolLM2 does the full round trips.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from conftest import MODEL_NAME, LiveServer, start_server
from pydantic import BaseModel, Field
from test_tool_parsers import TEMPLATES
from transformers import AutoTokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer",
                                                                                 "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                  "properties": {}}}}
QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    likes_tea: bool


def check_weather_arguments(arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])


# ---- the shared tiny server (no tool flags) ----------------------------------------------------------


def test_parse_returns_a_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL_NAME, messages=QUESTION, response_format=Person, max_tokens=80, seed=1
    )
    assert isinstance(completion.choices[0].message.parsed, Person)


def test_json_object_and_n_samples_follow_the_schema(client: openai.OpenAI) -> None:
    # closed, as OpenAI's strict schemas are: an open object lets a random model add keys until max_tokens
    schema = {**Person.model_json_schema(), "additionalProperties": False}
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=80, n=3, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=40, response_format={"type": "json_object"}
    )
    assert response.choices[0].message.content.startswith("{")


def test_completions_take_structured_outputs_and_guided_fields(client: openai.OpenAI) -> None:
    regex = r"[0-9]{3}-[a-z]{2,4}"
    for extra in ({"structured_outputs": {"regex": regex}}, {"guided_regex": regex}):
        response = client.completions.create(
            model=MODEL_NAME, prompt="Code:", max_tokens=20, extra_body=extra
        )
        assert re.fullmatch(regex, response.choices[0].text), response.choices[0].text
    choices = ["alpha", "beta", "gamma"]
    stream = client.completions.create(
        model=MODEL_NAME, prompt="Pick:", max_tokens=20, stream=True, n=2,
        extra_body={"guided_choice": choices},
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert sorted(texts) == [0, 1] and all(t in choices for t in texts.values())


def test_a_hundred_thousand_choices_compile_and_bind(client: openai.OpenAI) -> None:
    # as llguidance's Lark "choice" rule this build took 17 s of CPU and was cut off by the compile timeout
    choices = [f"option {i}" for i in range(100_000)]
    completion = client.completions.create(
        model=MODEL_NAME, prompt="pick", max_tokens=10, extra_body={"guided_choice": choices}
    )
    assert completion.choices[0].text in choices


def test_required_tool_call_round_trip(client: openai.OpenAI) -> None:
    tools = [WEATHER_TOOL, TIME_TOOL]
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, tools=tools, tool_choice="required", max_tokens=120, seed=3,
        parallel_tool_calls=False,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    if call.function.name == "get_weather":
        check_weather_arguments(call.function.arguments)
    history = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "-3 C, snow"},
    ]
    answer = client.chat.completions.create(model=MODEL_NAME, messages=history, tools=tools, max_tokens=5,
                                            tool_choice="none")
    assert answer.choices[0].message.tool_calls in (None, [])
    # named: always that function, arguments valid; streamed through the client's own helper
    with client.chat.completions.stream(
        model=MODEL_NAME, messages=QUESTION, tools=tools, max_tokens=80, seed=4,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id
    check_weather_arguments(call.function.arguments)


def test_required_tool_calls_stream_as_deltas(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL_NAME, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=150,
        seed=5, parallel_tool_calls=False,  # a random model would add calls until max_tokens
    ) as stream:
        chunks = [event for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and final.choices[0].finish_reason == "tool_calls"
    for call in calls:
        assert call.function.name == "get_weather"
        check_weather_arguments(call.function.arguments)
    fragments = [
        c for chunk in chunks for choice in chunk.chunk.choices for c in choice.delta.tool_calls or []
    ]
    assert len(fragments) > len(calls)  # the arguments came in pieces, after the id and name


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "a(b"}}, "guided_regex"),
    ({"extra_body": {"guided_grammar": "start: nothing_defined"}}, "guided_grammar"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
    ({"extra_body": {"guided_choice": ["a"]}, "response_format": {"type": "json_object"}}, "response_format"),
    ({"extra_body": {"functions": [{"name": "f", "parameters": {}}]}}, "functions"),
    ({"tools": [WEATHER_TOOL]}, "tool_choice"),  # "auto" needs --enable-auto-tool-choice
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    # constraints no text satisfies: served, they ended at once with "" and finish_reason "stop"
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": r"a[^\s\S]"}}, "guided_regex"),
    ({"extra_body": {"guided_grammar": "start: a\na: a"}}, "guided_grammar"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    # a grammar larger than 64 KiB (its build is not bounded by llguidance's fuel)
    ({"extra_body": {"guided_grammar": "start: " + " | ".join(f'"c{i}"' for i in range(20_000))}},
     "guided_grammar"),
    # a schema the request gives but whose type ignores it
    ({"response_format": {"type": "text", "json_schema": {"name": "x", "schema": {"type": "integer"}}}},
     "response_format"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_REQUESTS)
def test_invalid_constraints_are_a_400_naming_the_field(
    client: openai.OpenAI, server: LiveServer, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=5, **fields)
    assert caught.value.body["param"] == param, caught.value.body
    server.wait_idle()


# ---- a tiny server with a Qwen-style template and the hermes / qwen3 parsers ---------------------------


@pytest.fixture(scope="module")
def hermes_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    model = tmp_path_factory.mktemp("hermes") / "model"
    model.mkdir()
    for item in tiny_model.iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = TEMPLATES["hermes"]
    tokenizer.save_pretrained(model)
    live = start_server(
        tmp_path_factory.mktemp("hermes-log"), str(model), "--served-model-name", MODEL_NAME,
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
    )
    live.model_path = model  # type: ignore[attr-defined]
    yield live
    assert live.stop() == 0, live.log()[-4000:]


# what a Qwen3 model writes when it thinks and then calls a tool, made certain with a regex
HERMES_REPLY = (
    r'<think>[a-z]{1,8}</think>\n\nOn it\.\n<tool_call>\n\{"name": "get_weather", "arguments": '
    r'\{"city": "[A-Z][a-z]{1,6}", "days": [1-7]\}\}\n</tool_call>'
)


def test_hermes_calls_and_reasoning_through_the_template(hermes_server: LiveServer) -> None:
    client = hermes_server.client()
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "-3 C"},
        {"role": "user", "content": "And Rome?"},
    ]
    request = {"model": MODEL_NAME, "messages": history, "tools": [WEATHER_TOOL], "max_tokens": 150,
               "extra_body": {"guided_regex": HERMES_REPLY}}
    response = client.chat.completions.create(**request)
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert re.fullmatch("[a-z]{1,8}", message.reasoning_content) and message.content == "On it."
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    check_weather_arguments(call.function.arguments)
    # the template saw the tools, the earlier call and its result: the prompt is HF's rendering of them
    tokenizer = AutoTokenizer.from_pretrained(hermes_server.model_path)  # type: ignore[attr-defined]
    text = tokenizer.apply_chat_template(
        [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
            c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m
         for m in history],
        tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True,
    )
    assert response.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    with client.chat.completions.stream(**request) as stream:
        reasoning = "".join(
            getattr(e.chunk.choices[0].delta, "reasoning_content", None) or ""
            for e in stream if e.type == "chunk" and e.chunk.choices
        )
        final = stream.get_final_completion()
    assert re.fullmatch("[a-z]{1,8}", reasoning)
    assert final.choices[0].finish_reason == "tool_calls"
    (call,) = final.choices[0].message.tool_calls
    check_weather_arguments(call.function.arguments)
    hermes_server.wait_idle()


# ---- the embedded SmolLM2 ---------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_parses_and_calls_tools(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-model-len", "1024")
    try:
        client = server.client(timeout=600)
        model = "SmolLM2-135M-Instruct"
        parsed = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": "Invent a person as JSON."}],
            response_format=Person, max_tokens=60, temperature=0,
        )
        assert isinstance(parsed.choices[0].message.parsed, Person)
        first = client.chat.completions.create(
            model=model, messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60,
            temperature=0, parallel_tool_calls=False,
        )
        (call,) = first.choices[0].message.tool_calls
        check_weather_arguments(call.function.arguments)
        history = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "-3 C and snowing"}]
        with client.chat.completions.stream(
            model=model, messages=history, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60,
            temperature=0, parallel_tool_calls=False,  # a 135M model, given the chance, repeats the call
        ) as stream:
            final = stream.get_final_completion()
        assert final.choices[0].finish_reason == "tool_calls"
        for call in final.choices[0].message.tool_calls:
            check_weather_arguments(call.function.arguments)
        server.wait_idle()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
