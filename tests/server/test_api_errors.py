"""Bad input gets a 4xx with OpenAI's error body, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from conftest import MODEL_NAME, LiveServer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, b'{"messages": [{"role": "user", "content": "hi"}'),  # malformed JSON
        (CHAT, b"not json at all"),
        (CHAT, b"[1, 2]"),  # JSON, but not an object
        (COMPLETIONS, b""),
        (CHAT, {"messages": "hi"}),  # wrong types
        (CHAT, {"messages": MESSAGES, "max_tokens": "ten"}),
        (COMPLETIONS, {"prompt": {"text": "x"}}),
        (COMPLETIONS, {"prompt": "x", "stream": "maybe"}),
        (CHAT, {"messages": MESSAGES, "temperature": 7}),  # out of range
        (CHAT, {"messages": MESSAGES, "n": 0}),
        (CHAT, {"messages": MESSAGES, "top_p": 0}),
        (COMPLETIONS, {"prompt": "x", "logprobs": 50}),
        (COMPLETIONS, {"prompt": [], "max_tokens": 1}),
        (COMPLETIONS, {"prompt": [100000], "max_tokens": 1}),  # not a token of this vocabulary
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        ),
        (CHAT, {"messages": MESSAGES, "min_tokens": 9, "max_tokens": 2}),
        ("/detokenize", {"tokens": [100000]}),
        ("/tokenize", {}),
    ],
)
def test_invalid_requests_are_400(server: LiveServer, path: str, body: object) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.base_url + path, headers=server.headers, timeout=30, **kwargs)
    assert assert_error(response, 400)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        # a union (prompt: text, texts, token ids, lists of them) reports the member the input fits, named
        # by field path; it used to say "prompt.function-after[_encodable(), str]: should be a valid string"
        (COMPLETIONS, {"prompt": [-1]}, "prompt.0", "greater than or equal to 0"),
        (COMPLETIONS, {"prompt": [[1], [2**40]]}, "prompt.1.0", "less than or equal to"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages.0.content.0.type", "'text'"),
        (CHAT, {"messages": MESSAGES, "tool_choice": "sometimes"}, "tool_choice", "'required'"),
        # checks across fields name theirs (they had param null)
        (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of", "best_of == n"),
        (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop", "non-empty"),
        # the engine's per-step search for a stop string's start grows with the square of its length
        (COMPLETIONS, {"prompt": "x", "stop": ["Q" * 100_000]}, "stop", "at most 256 characters"),
        (CHAT, {"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        (CHAT, {"messages": MESSAGES, "min_tokens": 300}, "min_tokens", "max_tokens"),  # the context's rest
        # fields the server cannot honour are rejected, not ignored (vLLM extras, newer OpenAI options)
        (COMPLETIONS, {"prompt": "x", "use_beam_search": True}, "use_beam_search", "Unrecognized"),
        (CHAT, {"messages": MESSAGES, "echo": True}, "echo", "Unrecognized"),
        (CHAT, {"messages": MESSAGES, "modalities": ["audio"]}, "modalities", "Unrecognized"),
        (CHAT, {"messages": MESSAGES, "stream": True, "stream_options": {"include_obfuscation": False}},
         "stream_options.include_obfuscation", "Unrecognized"),
    ],
)
def test_the_error_names_the_field(server: LiveServer, path: str, body: dict, param: str, says: str) -> None:
    response = httpx.post(server.base_url + path, json=body, headers=server.headers, timeout=30)
    error = assert_error(response, 400)
    assert error["param"] == param and says in error["message"], error


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x" * 300, "max_tokens": 1},  # the prompt alone is longer than max_model_len (256)
        {"prompt": "x" * 200, "max_tokens": 100},  # prompt + max_tokens is
    ],
)
def test_too_long_requests_are_400(server: LiveServer, body: dict) -> None:
    response = httpx.post(server.base_url + COMPLETIONS, json=body, headers=server.headers, timeout=30)
    error = assert_error(response, 400)
    assert error["code"] == "context_length_exceeded" and "256" in error["message"]


def test_unknown_model_is_404(server: LiveServer) -> None:
    response = httpx.post(
        server.base_url + CHAT, json={"model": "gpt-9", "messages": MESSAGES}, headers=server.headers
    )
    assert assert_error(response, 404)["code"] == "model_not_found"
    assert_error(httpx.get(server.base_url + "/v1/nothing-here", headers=server.headers), 404)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}])
def test_a_missing_or_wrong_key_is_401_and_probes_stay_open(server: LiveServer, headers: dict) -> None:
    response = httpx.post(server.base_url + CHAT, json={"messages": MESSAGES}, headers=headers)
    assert assert_error(response, 401)["type"] == "authentication_error"
    assert_error(httpx.get(server.base_url + "/v1/models", headers=headers), 401)
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.base_url + path, headers=headers).status_code == 200


def test_an_oversized_body_is_413(server: LiveServer) -> None:
    response = httpx.post(
        server.base_url + COMPLETIONS,
        content=b"{" + b" " * (33 * 2**20) + b"}",
        headers={**server.headers, "Content-Type": "application/json"},
        timeout=60,
    )
    assert_error(response, 413)


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_json_body_is_read_as_json_whatever_its_content_type(
    server: LiveServer, content_type: str | None
) -> None:
    # as the OpenAI API: `curl -d` sends a form content type
    headers = {**server.headers, **({"Content-Type": content_type} if content_type else {})}
    body = b'{"prompt": "hi", "max_tokens": 2}'
    response = httpx.post(server.base_url + COMPLETIONS, content=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def test_the_server_still_serves_after_bad_input(server: LiveServer) -> None:
    response = httpx.post(
        server.base_url + CHAT,
        headers=server.headers,
        timeout=60,
        json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3},
    )
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(server.base_url + "/health").status_code == 200
    server.wait_idle()
