"""The offline API's sampling features, checked against transformers and torch references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import EOS_ID, load_reference_model, make_tiny_model, make_tiny_tokenizer, reference_greedy

from pagoda import LLM, SamplingParams
from pagoda.sampling_params import RequestOutputKind


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model=str(model_dir), block_size=4, max_model_len=64)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> torch.nn.Module:
    return load_reference_model(model_dir)


def tokens(prompt: str) -> dict[str, list[int]]:
    return {"prompt_token_ids": list(prompt.encode())}


def test_n_samples_share_prompt_blocks_and_differ(llm: LLM) -> None:
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, ignore_eos=True, seed=3)
    before = llm.engine.get_stats().prefix_cache_hits
    [out] = llm.generate([tokens("a prompt long enough to fill blocks")], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # samples 1..3 reuse the first sample's full prompt blocks (35 tokens: 8 full blocks of 4)
    assert llm.engine.get_stats().prefix_cache_hits - before == 3 * 32


def test_seeded_sampling_ignores_the_rest_of_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, ignore_eos=True, seed=1234)
    alone = llm.generate([tokens("hello")], seeded, use_tqdm=False)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    batch = llm.generate([tokens("xyz"), tokens("hello"), tokens("other")], [noisy, seeded, noisy],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_logprobs_match_the_reference_distribution(llm: LLM, reference: torch.nn.Module) -> None:
    prompt = list(b"logprobs please")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    [out] = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    completion = out.outputs[0]
    full = prompt + completion.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([full])).logits[0].float(), dim=-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(prompt) - 1 + step]
        assert entry[token] == pytest.approx(row[token].item(), abs=1e-4)
        top2 = row.topk(2).indices.tolist()
        assert set(top2) <= set(entry)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        expected = ref[pos - 1, prompt[pos]].item()
        assert out.prompt_logprobs[pos][prompt[pos]] == pytest.approx(expected, abs=1e-4)


def test_stop_strings_tokens_and_lengths(llm: LLM, reference: torch.nn.Module) -> None:
    prompt = list(b"stop here")
    greedy, _ = reference_greedy(reference, prompt, 12)
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    [plain] = llm.generate([{"prompt_token_ids": prompt}], base, use_tqdm=False)
    assert plain.outputs[0].token_ids == greedy and plain.outputs[0].finish_reason == "length"

    stop_token = greedy[4]
    [by_id] = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                          stop_token_ids=[stop_token]), use_tqdm=False)
    first = greedy.index(stop_token)
    assert by_id.outputs[0].token_ids == greedy[: first + 1]
    assert by_id.outputs[0].finish_reason == "stop" and by_id.outputs[0].stop_reason == stop_token

    plain_text = plain.outputs[0].text
    # a stop string taken from the middle of the greedy text (avoiding replacement characters)
    at = next(i for i in range(2, len(plain_text) - 1) if "\ufffd" not in plain_text[i : i + 2])
    stop = plain_text[at : at + 2]
    [by_str] = llm.generate([{"prompt_token_ids": prompt}],
                            SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]),
                            use_tqdm=False)
    assert by_str.outputs[0].text == plain_text[: plain_text.index(stop)]
    assert by_str.outputs[0].finish_reason == "stop" and by_str.outputs[0].stop_reason == stop


def test_output_kinds_and_token_ids_without_text(llm: LLM, reference: torch.nn.Module) -> None:
    """A cumulative output every step, or the final one only (what LLM.generate asks for); detokenize=False
    gives the same tokens without text."""
    prompt = list(b"kinds of output")
    greedy, _ = reference_greedy(reference, prompt, 5)
    engine = llm.engine
    kinds = {"cumulative": RequestOutputKind.CUMULATIVE, "final": RequestOutputKind.FINAL_ONLY}
    for request_id, kind in kinds.items():
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, output_kind=kind)
        engine.add_request(request_id, prompt, params)
    seen: dict[str, list[list[int]]] = {request_id: [] for request_id in kinds}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output.outputs[0].token_ids)
    assert seen["cumulative"] == [greedy[:i] for i in range(1, 6)]
    assert seen["final"] == [greedy]

    [out] = llm.generate([{"prompt_token_ids": prompt}],
                         SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, detokenize=False),
                         use_tqdm=False)
    assert out.outputs[0].token_ids == greedy and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="DELTA"):
        SamplingParams(output_kind=RequestOutputKind.DELTA)


def test_final_only_text_is_the_streamed_text(llm: LLM) -> None:
    """A FINAL_ONLY request without stop strings is detokenized when it ends, not token by token: its text
    is the decode of its tokens, as a streamed request's is, for samples that end at different steps (a stop
    token, the length) and bytes that split characters."""
    engine, tokenizer = llm.engine, llm.get_tokenizer()
    prompt = list("naïve 日本 🎉".encode())
    texts: dict[RequestOutputKind, list[str]] = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
        stops = list(range(60, 200))  # stop token ids: EOS alone would seldom come
        params = SamplingParams(
            n=4, temperature=1.5, max_tokens=12, seed=7, stop_token_ids=stops, output_kind=kind
        )
        engine.add_request(kind.name, prompt, params)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    texts[kind] = [c.text for c in output.outputs]
                    assert texts[kind] == [tokenizer.decode(c.token_ids, skip_special_tokens=True)
                                           for c in output.outputs]
                    assert len({len(c.token_ids) for c in output.outputs}) > 1  # ended at different steps
    assert texts[RequestOutputKind.FINAL_ONLY] == texts[RequestOutputKind.CUMULATIVE]


def test_min_tokens_and_eos(llm: LLM) -> None:
    # forbid everything but EOS-prone behaviour: min_tokens must hold EOS back
    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10)
    [out] = llm.generate([tokens("eos test")], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 10 and EOS_ID not in out.outputs[0].token_ids


def test_abort_frees_blocks_at_any_moment(llm: LLM) -> None:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request("waiting-and-running", list(b"abort me please, I am long"), params)
    engine.add_request("other", list(b"keep going"), params)
    engine.step()
    assert engine.get_stats().kv_cache_usage > 0
    engine.abort_request("waiting-and-running")
    engine.abort_request("unknown-id")  # a no-op
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.get_stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0


def test_bad_requests_are_rejected_with_clear_errors(llm: LLM) -> None:
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 384\)"):
        llm.generate([{"prompt_token_ids": [1, 99999]}], use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert llm.engine.get_stats().kv_cache_usage == 0.0


def test_the_embedded_model_answers_a_factual_question() -> None:
    llm = LLM(max_model_len=256, kv_cache_memory=64 << 20)
    # The bare question starts the answer with a near-tie ("The" vs "L'", 0.1 nats apart in float32)
    # that bfloat16 rounding can flip into a ramble; asking for a sentence makes every precision and
    # quantization of this 135M model answer it.
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                     SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_prompt_logprobs_are_whole_when_the_prefix_is_cached(llm: LLM) -> None:
    prompt = {"prompt_token_ids": list(b"a cached prefix, scored twice")}
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    first = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    assert first[0].prompt_logprobs is None
    [scored] = llm.generate([prompt], params, use_tqdm=False)
    assert len(scored.prompt_logprobs) == len(prompt["prompt_token_ids"])
    assert all(entry is not None for entry in scored.prompt_logprobs[1:])


def test_a_tokenizer_of_its_own_serves_a_model_that_ships_none(tmp_path: Path) -> None:
    bare = make_tiny_model("llama", tmp_path / "bare", with_tokenizer=False)
    tokenizer = make_tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert LLM(model=str(bare), block_size=4, max_model_len=64).get_tokenizer() is None
    llm = LLM(model=str(bare), tokenizer=str(tmp_path / "tokenizer"), block_size=4, max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    token_ids = tokenizer.encode("tokenized elsewhere")
    [by_text] = llm.generate(["tokenized elsewhere"], params, use_tqdm=False)
    [by_ids] = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids == token_ids
    assert by_text.outputs[0].text == tokenizer.decode(by_ids.outputs[0].token_ids)
