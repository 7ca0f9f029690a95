"""Single requests that used to do damage: out-of-vocabulary ids, lone surrogates, loose types, template
inputs, and bodies that held the event loop. Plus logit_bias / allowed_token_ids / bad_words, checked
against greedy decoding over transformers' own logits."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from conftest import LiveServer
from tiny_models import VOCAB_SIZE
from transformers import AutoTokenizer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
PROMPT = "The paged cache"
FIXED = {"temperature": 0, "ignore_eos": True}


def post(server: LiveServer, path: str, body: object, **kwargs: object) -> httpx.Response:
    if isinstance(body, bytes | Iterator):
        kwargs["content"] = body
    else:
        kwargs["json"] = body
    return httpx.post(server.base_url + path, headers=server.headers, timeout=60, **kwargs)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- token ids are checked against the vocabulary, and the engine survives ------------------------------


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        (COMPLETIONS, {"prompt": [1, 2, VOCAB_SIZE]}, "prompt"),
        (COMPLETIONS, {"prompt": [[1, 2], [VOCAB_SIZE]]}, "prompt"),
        (COMPLETIONS, {"prompt": "x", "stop_token_ids": [VOCAB_SIZE], "min_tokens": 2}, "stop_token_ids"),
        (CHAT, {"messages": MESSAGES, "stop_token_ids": [2**31 - 1]}, "stop_token_ids"),
        (COMPLETIONS, {"prompt": "x", "logit_bias": {str(VOCAB_SIZE): 5}}, "logit_bias"),
        (CHAT, {"messages": MESSAGES, "logit_bias": {"-1": 5}}, "logit_bias"),
        (CHAT, {"messages": MESSAGES, "logit_bias": {"a": 5}}, "logit_bias"),
        (CHAT, {"messages": MESSAGES, "logit_bias": {"3": 101}}, "logit_bias.3"),
        (COMPLETIONS, {"prompt": "x", "allowed_token_ids": [1, VOCAB_SIZE]}, "allowed_token_ids"),
        (COMPLETIONS, {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
        ("/detokenize", {"tokens": [VOCAB_SIZE]}, "tokens"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_400(
    server: LiveServer, path: str, fields: dict, param: str
) -> None:
    body = {"max_tokens": 3, **fields} if path != "/detokenize" else fields
    assert error_of(post(server, path, body))["param"] == param
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_a_request_for_too_many_tokens_in_all_is_400(server: LiveServer) -> None:
    # 32 samples of 200 tokens: more than 16 full contexts (of 256) of generation for one request
    error = error_of(post(server, COMPLETIONS, {"prompt": "x", "n": 32, "max_tokens": 200}))
    assert error["param"] == "max_tokens" and "4096" in error["message"]


def test_echoed_prompt_logprobs_count_toward_the_bound(server: LiveServer) -> None:
    # 128 echoes of a 200-token prompt with logprobs: 25.7k tokens in the response (it was not bounded)
    body = {"prompt": "x" * 200, "n": 128, "echo": True, "logprobs": 1, "max_tokens": 1}
    error = error_of(post(server, COMPLETIONS, body))
    assert error["param"] == "max_tokens" and "echoed prompt" in error["message"]
    assert post(server, COMPLETIONS, {**body, "n": 16}).status_code == 200  # 16 x 201 tokens fit in 4096


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, {"prompt": ["fine", "word " * (4 * 2**20)], "max_tokens": 1}, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": "word " * (4 * 2**20)}]}, "messages"),
    ],
)
def test_a_text_no_context_can_hold_is_rejected_before_tokenizing(
    server: LiveServer, path: str, body: dict, param: str
) -> None:
    # 20 MB of text: tokenized in full, it held the tokenizing thread (every request's) for about 30 s
    error = error_of(post(server, path, body))
    assert error["param"] == param and error["code"] == "context_length_exceeded"
    assert "characters" in error["message"]  # counted, not tokenized


def test_the_culprit_param_is_named(server: LiveServer) -> None:
    too_long = error_of(post(server, COMPLETIONS, {"prompt": "x" * 300, "max_tokens": 1}))
    assert too_long["param"] == "prompt" and too_long["code"] == "context_length_exceeded"
    long_chat = error_of(post(server, CHAT, {"messages": [{"role": "user", "content": "x" * 300}]}))
    assert long_chat["param"] == "messages"
    too_many = error_of(post(server, COMPLETIONS, {"prompt": "x" * 200, "max_tokens": 100}))
    assert too_many["param"] == "max_tokens"


# ---- strict types, lone surrogates, best_of ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        (CHAT, {"messages": MESSAGES, "logprobs": "yes"}, "logprobs"),
        (CHAT, {"messages": MESSAGES, "logprobs": 1}, "logprobs"),
        (CHAT, {"messages": MESSAGES, "n": 1.0}, "n"),
        (CHAT, {"messages": MESSAGES, "max_tokens": "3"}, "max_tokens"),
        (COMPLETIONS, {"prompt": "x", "echo": "true"}, "echo"),
        (COMPLETIONS, {"prompt": "x", "temperature": "0.5"}, "temperature"),
        (COMPLETIONS, {"prompt": "x", "best_of": 2}, "best_of"),
    ],
)
def test_loose_types_and_unsupported_fields_are_400(
    server: LiveServer, path: str, fields: dict, param: str | None
) -> None:
    error = error_of(post(server, path, {"max_tokens": 2, **fields}))
    assert error["param"] == param or error["message"].startswith(f"{param}:")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (COMPLETIONS, b'{"prompt": "a\\ud800b", "max_tokens": 2}'),
        (COMPLETIONS, b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
        (CHAT, b'{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}'),
        (CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'),
        (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}'),
        (
            CHAT,
            b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"a": "\\udc00"}}',
        ),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
        ("/tokenize", b'{"messages": [{"role": "user", "content": "\\udc00"}]}'),
    ],
)
def test_lone_surrogates_are_400(server: LiveServer, path: str, body: bytes) -> None:
    error_of(post(server, path, body))


def test_best_of_equal_to_n_is_accepted(server: LiveServer) -> None:
    response = post(server, COMPLETIONS, {"prompt": "x", "max_tokens": 2, "n": 2, "best_of": 2})
    assert response.status_code == 200 and len(response.json()["choices"]) == 2


# ---- templates from requests --------------------------------------------------------------------------


def test_request_chat_templates_need_the_flag(server: LiveServer) -> None:
    error = error_of(post(server, CHAT, {"messages": MESSAGES, "chat_template": "{{ 'x' }}"}))
    assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]


@pytest.mark.parametrize(
    "kwargs",
    [{"blob": "x" * (65 * 2**10)}, {"tokenize": True}, {"chat_template": "{{ 'x' }}"}],
)
def test_template_kwargs_are_bounded(server: LiveServer, kwargs: dict) -> None:
    error = error_of(post(server, CHAT, {"messages": MESSAGES, "chat_template_kwargs": kwargs}))
    assert error["param"] == "chat_template_kwargs"


# ---- logit_bias, allowed_token_ids, bad_words against transformers ------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    from tiny_models import load_reference_model

    return load_reference_model(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


@torch.no_grad()
def greedy_with(
    model,
    prompt: list[int],
    steps: int,
    bias: dict[int, float] | None = None,
    allowed: list[int] | None = None,
    bad_words: list[list[int]] | None = None,
) -> list[int]:
    """Greedy decoding over the model's own logits with the filters applied as OpenAI / vLLM define them."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
        for token, value in (bias or {}).items():
            logits[token] += value
        if allowed is not None:
            mask = torch.full_like(logits, float("-inf"))
            mask[allowed] = 0
            logits += mask
        completion = tokens[len(prompt) :]
        for *prefix, last in bad_words or []:
            if len(prefix) <= len(completion) and completion[len(completion) - len(prefix) :] == prefix:
                logits[last] = float("-inf")
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


def complete_ids(server: LiveServer, prompt: list[int], steps: int, **fields: object) -> str:
    body = {"prompt": prompt, "max_tokens": steps, **FIXED, **fields}
    response = post(server, COMPLETIONS, body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_logit_bias_changes_greedy_output_as_transformers_predicts(server: LiveServer, reference) -> None:
    model, tokenizer = reference
    prompt = tokenizer.encode(PROMPT)
    plain = greedy_with(model, prompt, 8)
    assert complete_ids(server, prompt, 8) == tokenizer.decode(plain)
    banned = {plain[0]: -100.0, plain[1]: -100.0}
    expected = greedy_with(model, prompt, 8, bias=banned)
    assert expected != plain  # the bias must matter for this test to mean anything
    got = complete_ids(server, prompt, 8, logit_bias={str(t): b for t, b in banned.items()})
    assert got == tokenizer.decode(expected)
    forced = ord("Q")  # +100 on one byte token makes it the greedy choice every step
    assert complete_ids(server, prompt, 4, logit_bias={str(forced): 100}) == "QQQQ"


def test_allowed_token_ids_as_transformers_predicts(server: LiveServer, reference) -> None:
    model, tokenizer = reference
    prompt = tokenizer.encode(PROMPT)
    allowed = [ord(c) for c in "abcxyz "]
    expected = greedy_with(model, prompt, 8, allowed=allowed)
    got = complete_ids(server, prompt, 8, allowed_token_ids=allowed)
    assert got == tokenizer.decode(expected) and set(got) <= set("abcxyz ")


def test_bad_words_as_transformers_predicts(server: LiveServer, reference) -> None:
    model, tokenizer = reference
    prompt = tokenizer.encode(PROMPT)
    letters = [ord(c) for c in "abcdefghijklmnopqrstuvwxyz"]  # so that every token is a printable byte
    plain = greedy_with(model, prompt, 10, allowed=letters)
    word = tokenizer.decode(plain[2:4])  # a two-token word the plain continuation contains
    variants = [tokenizer.encode(w, add_special_tokens=False) for w in (word, " " + word.lstrip())]
    expected = greedy_with(model, prompt, 10, allowed=letters, bad_words=variants)
    assert expected != plain and word not in tokenizer.decode(expected)
    got = complete_ids(server, prompt, 10, allowed_token_ids=letters, bad_words=[word])
    assert got == tokenizer.decode(expected)


# ---- the event loop stays free: /health while big bodies and prompts are in flight ----------------------


class HealthProbe(threading.Thread):
    """Times /health every 20 ms on its own connection until stopped."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.started = threading.Event()  # a first probe answered: work that ends at once still has one

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                assert client.get(f"{self.base_url}/health").status_code == 200
                self.latencies.append(time.perf_counter() - start)
                self.started.set()
                self.stop.wait(0.02)


def probe_while(server: LiveServer, work) -> tuple[list[float], object]:  # noqa: ANN001
    probe = HealthProbe(server.base_url)
    probe.start()
    assert probe.started.wait(30)
    try:
        result = work()
    finally:
        probe.stop.set()
        probe.join(30)
    assert probe.latencies
    return probe.latencies, result


def chunks(total: int, size: int = 2**20) -> Iterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'", "max_tokens": 1}'


def test_health_answers_fast_while_a_50mb_chunked_body_and_a_2mb_prompt_are_in_flight(
    server: LiveServer,
) -> None:
    def send_chunked() -> int:
        try:  # no Content-Length: the body streams in chunks and is cut off at the 32 MiB cap
            return post(server, COMPLETIONS, chunks(50 * 2**20)).status_code
        except httpx.TransportError:
            return 413  # the server may close the connection before the client has sent everything

    body_latencies, status = probe_while(server, send_chunked)
    assert status == 413
    prompt = {"prompt": "a few words " * (2 * 2**20 // 12), "max_tokens": 1}
    prompt_latencies, response = probe_while(server, lambda: post(server, COMPLETIONS, prompt))
    assert error_of(response)["param"] == "prompt"  # far longer than the context, found by tokenizing it
    print(
        f"\n/health latency: 50 MB chunked body: max {max(body_latencies) * 1e3:.1f} ms over "
        f"{len(body_latencies)} probes; 2 MB prompt: max {max(prompt_latencies) * 1e3:.1f} ms over "
        f"{len(prompt_latencies)} probes"
    )
    assert max(body_latencies) < 1.0 and max(prompt_latencies) < 1.0
    assert httpx.get(f"{server.base_url}/metrics", timeout=5).status_code == 200


def token_ids_body(field: str, count: int) -> bytes:
    return b'{"prompt": "x", "max_tokens": 1, "%s": [' % field.encode() + b"1," * (count - 1) + b"1]}"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        # 15M values in 30 MB: validated on the event loop, this held /health for 13 s
        (token_ids_body("allowed_token_ids", 15 * 2**20), 413),
        # 2M values: parsed and validated on a worker thread, rejected by the bound on token-id lists
        (token_ids_body("stop_token_ids", 2**21 - 8), 400),
        # a body that passes validation, with every check after it (the ids against the vocabulary)
        (token_ids_body("stop_token_ids", 2**20), 200),
    ],
)
def test_health_answers_while_a_body_of_millions_of_values_is_checked(
    server: LiveServer, body: bytes, status: int
) -> None:
    latencies, response = probe_while(server, lambda: post(server, COMPLETIONS, body))
    assert response.status_code == status, response.text
    print(f"\n/health latency: max {max(latencies) * 1e3:.1f} ms over {len(latencies)} probes")
    assert max(latencies) < 1.0
