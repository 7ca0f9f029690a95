"""The official openai client against a live `pagoda serve`, checked against Hugging Face transformers."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import pytest
import torch
from conftest import MODEL_NAME, LiveServer
from transformers import AutoTokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
FIXED_LENGTH = {"ignore_eos": True}  # vLLM's extra: generate exactly max_tokens


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    from tiny_models import load_reference_model

    return load_reference_model(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == 256


def test_greedy_completion_and_logprobs_equal_transformers(client: openai.OpenAI, reference) -> None:
    from tiny_models import reference_greedy

    model, tokenizer = reference
    prompt = "The paged cache"
    prompt_ids = tokenizer.encode(prompt)
    expected_ids, logits = reference_greedy(model, prompt_ids, 12)
    result = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3, extra_body=FIXED_LENGTH
    )
    choice = result.choices[0]
    assert choice.text == tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == len(prompt_ids) and result.usage.completion_tokens == 12
    assert result.usage.total_tokens == len(prompt_ids) + 12
    reference_logprobs = torch.log_softmax(logits, dim=-1)
    assert len(choice.logprobs.token_logprobs) == 12
    for i, (token_id, logprob, top) in enumerate(
        zip(expected_ids, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs)
    ):
        assert logprob == pytest.approx(reference_logprobs[i, token_id].item(), abs=1e-3)
        # the legacy shape keys by token text, so byte tokens that print alike ("\ufffd") share an entry
        top3 = reference_logprobs[i].topk(3).values.tolist()
        assert max(top.values()) == pytest.approx(top3[0], abs=1e-3)
        assert all(any(abs(v - r) < 1e-3 for r in top3) for v in top.values())


def test_chat_prompt_is_the_chat_template(client: openai.OpenAI, reference) -> None:
    _, tokenizer = reference
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=5, extra_body=FIXED_LENGTH
    )
    assert result.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    assert result.usage.completion_tokens == 5 and result.choices[0].finish_reason == "length"
    assert result.choices[0].message.role == "assistant" and result.object == "chat.completion"


@pytest.mark.parametrize("n", [1, 2])
def test_streamed_chat_concatenates_to_the_non_streamed_text(client: openai.OpenAI, n: int) -> None:
    options = {
        "model": MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 24,
        "n": n,
        "seed": 11,
        "temperature": 0.9,
    }
    whole = client.chat.completions.create(**options)
    chunks = list(
        client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True})
    )
    texts, finish = [""] * n, [None] * n
    first_delta = {}
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.usage is None
        for choice in chunk.choices:
            first_delta.setdefault(choice.index, choice.delta)
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = finish[choice.index] or choice.finish_reason
    assert all(delta.role == "assistant" for delta in first_delta.values()) and len(first_delta) == n
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert finish == [c.finish_reason for c in sorted(whole.choices, key=lambda c: c.index)]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streamed_completion_concatenates_to_the_non_streamed_text(client: openai.OpenAI) -> None:
    options = {
        "model": MODEL_NAME,
        "prompt": ["one", "two"],
        "max_tokens": 20,
        "n": 2,
        "seed": 5,
        "temperature": 1.0,
    }
    whole = client.completions.create(**options)
    chunks = list(client.completions.create(**options, stream=True, stream_options={"include_usage": True}))
    texts = [""] * 4
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in whole.choices]
    assert chunks[-1].usage == whole.usage


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    options = {
        "model": MODEL_NAME,
        "prompt": "seed",
        "max_tokens": 16,
        "temperature": 1.0,
        "n": 2,
        "extra_body": FIXED_LENGTH,
    }
    first = client.completions.create(seed=1, **options)
    again = client.completions.create(seed=1, **options)
    other = client.completions.create(seed=2, **options)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # the n samples differ
    assert [c.text for c in first.choices] != [c.text for c in other.choices]


def test_stop_string_cuts_the_greedy_text(client: openai.OpenAI) -> None:
    options = {
        "model": MODEL_NAME,
        "prompt": "stop here",
        "max_tokens": 30,
        "temperature": 0,
        "extra_body": FIXED_LENGTH,
    }
    full = client.completions.create(**options).choices[0].text
    position, stop = next((i, ch) for i, ch in enumerate(full) if i >= 2 and ch.isascii() and ch.isalnum())
    cut = client.completions.create(stop=[stop], **options).choices[0]
    assert cut.finish_reason == "stop" and cut.model_extra["stop_reason"] == stop
    assert cut.text == full[: full.index(stop)] and position >= full.index(stop)


def test_prompt_forms_and_echo(client: openai.OpenAI, reference) -> None:
    _, tokenizer = reference
    options = {"model": MODEL_NAME, "max_tokens": 6, "temperature": 0, "extra_body": FIXED_LENGTH}
    by_text = client.completions.create(prompt="abc", **options).choices[0].text
    ids = tokenizer.encode("abc")
    assert client.completions.create(prompt=ids, **options).choices[0].text == by_text
    batch = client.completions.create(prompt=[ids, tokenizer.encode("xyz")], **options)
    assert batch.choices[0].text == by_text and batch.usage.completion_tokens == 12
    echoed = client.completions.create(prompt="abc", echo=True, logprobs=1, **options).choices[0]
    assert echoed.text == "abc" + by_text
    assert echoed.logprobs.token_logprobs[0] is None and len(echoed.logprobs.tokens) == len(ids) + 6
    assert all(lp <= 0 for lp in echoed.logprobs.token_logprobs[1:])
    # streamed, the echo (with the prompt's logprobs) comes first and the pieces add up to the same
    chunks = [c.choices[0] for c in client.completions.create(
        prompt="abc", echo=True, logprobs=1, stream=True, **options
    )]
    assert "".join(c.text for c in chunks) == echoed.text
    streamed = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
    assert streamed == echoed.logprobs.token_logprobs
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == echoed.logprobs.text_offset


def test_chat_logprobs(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body=FIXED_LENGTH,
    )
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the top token
        assert math.isfinite(entry.logprob) and entry.bytes == list(entry.token.encode())


def test_max_tokens_defaults_to_the_rest_of_the_context(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, extra_body=FIXED_LENGTH
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage.total_tokens == 256


def test_tokenize_detokenize_version(server: LiveServer, reference) -> None:
    import httpx

    _, tokenizer = reference
    tokens = httpx.post(
        f"{server.base_url}/tokenize", json={"prompt": "héllo"}, headers=server.headers
    ).json()
    assert tokens["tokens"] == tokenizer.encode("héllo") and tokens["count"] == len(tokens["tokens"])
    text = httpx.post(
        f"{server.base_url}/detokenize", json={"tokens": tokens["tokens"]}, headers=server.headers
    )
    assert text.json() == {"prompt": "héllo"}
    assert httpx.get(f"{server.base_url}/version").json()["version"]
