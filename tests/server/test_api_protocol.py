"""Request validation: what the OpenAI API accepts is accepted, what it rejects is a validation error."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from pagoda.entrypoints.protocol import MAX_TOKEN_IDS, ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt: object, expected: list) -> None:
    assert CompletionRequest(prompt=prompt).prompts == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": [""]},
        {"prompt": [-1]},
        {"prompt": 5},
        {"prompt": "x", "n": 0},
        {"prompt": "x", "temperature": -0.1},
        {"prompt": "x", "temperature": 2.5},
        {"prompt": "x", "top_p": 0},
        {"prompt": "x", "top_p": 1.1},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "logprobs": 21},
        {"prompt": "x", "presence_penalty": 3},
        {"prompt": "x", "frequency_penalty": -2.5},
        {"prompt": "x", "top_k": -2},
        {"prompt": "x", "min_p": 1.5},
        {"prompt": "x", "repetition_penalty": 0},
        {"prompt": "x", "stop": [""]},
        {"prompt": "x", "stop": ["s"] * 17},
        {"prompt": "x", "temperature": math.nan},
        {"prompt": "x", "top_p": math.inf},
        {"prompt": "x", "n": "two"},
        {"prompt": "x", "stream_options": {"include_usage": True}},
        {"prompt": "x", "seed": 2**64},
        # fields the server does not implement are rejected, as OpenAI rejects unknown arguments
        {"prompt": "x", "use_beam_search": True},
        {"prompt": "x", "prompt_logprobs": 1},
        {"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "continuous_usage": True}},
        {"prompt": "x", "structured_outputs": {"choice": []}},
        {"prompt": [1] * (MAX_TOKEN_IDS + 1)},
        {"prompt": "x", "allowed_token_ids": [1] * (MAX_TOKEN_IDS + 1)},
        {"prompt": ["x"] * 129},
    ],
)
def test_completion_rejects(fields: dict) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": MESSAGES, "max_completion_tokens": 0},
        {"messages": MESSAGES, "top_logprobs": 3},
        {"messages": MESSAGES, "top_logprobs": 21, "logprobs": True},
        {"messages": "hi"},
        {"messages": MESSAGES, "echo": True},
        {"messages": MESSAGES, "modalities": ["text", "audio"]},
        {"messages": MESSAGES, "response_format": {"type": "text", "json_schema": {"name": "a"}}},
        {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f", "strictness": 1}}]},
    ],
)
def test_chat_rejects(fields: dict) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**fields)


def test_chat_content_parts_and_token_budget() -> None:
    request = ChatCompletionRequest(
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ],
        max_tokens=5,
        max_completion_tokens=7,
    )
    assert request.messages[0].text() == "a\nb"
    assert request.requested_max_tokens == 7  # max_completion_tokens supersedes max_tokens


def test_messages_sent_back_as_received_are_accepted() -> None:
    # the official client's message objects carry fields the request never uses: they are history, not options
    assistant = {"role": "assistant", "content": "x", "refusal": None, "annotations": [], "audio": None}
    request = ChatCompletionRequest(messages=[*MESSAGES, assistant, *MESSAGES])
    assert request.messages[1].text() == "x"


def test_sampling_params_mapping() -> None:
    request = CompletionRequest(
        prompt="x",
        n=2,
        temperature=0,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=3,
        stop="END",
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=[7],
        logprobs=2,
    )
    params = request.sampling_params(max_tokens=10, logprobs=request.logprobs)
    assert params.n == 2 and params.greedy and params.top_p == 0.5 and params.top_k == 0
    assert params.min_p == 0.1 and params.repetition_penalty == 1.2 and params.seed == 3
    assert params.presence_penalty == 0.5 and params.frequency_penalty == -0.5
    assert params.stop == ["END"] and params.stop_token_ids == [7] and params.min_tokens == 2
    assert params.ignore_eos and params.max_tokens == 10 and params.logprobs == 2
    # repeated ids are dropped: the engine scans these lists every step
    repeated = CompletionRequest(prompt="x", allowed_token_ids=[5, 3] * 1000, stop_token_ids=[7] * 1000)
    params = repeated.sampling_params(max_tokens=1, logprobs=None)
    assert params.allowed_token_ids == [5, 3] and params.stop_token_ids == [7]
    defaults = CompletionRequest(prompt="x").sampling_params(max_tokens=16, logprobs=None)
    assert defaults.temperature == 1.0 and defaults.top_p == 1.0 and defaults.logprobs is None
