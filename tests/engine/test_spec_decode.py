"""Speculative decoding: outputs exactly the target's, however proposals are made, accepted or rolled back.

Greedy outputs are compared token for token with transformers (full recomputation) and with the engine
without speculation, for many prompts of different lengths under prefix-cache hits, preemption in a tiny
KV pool and chunked prefill; the rejection sampler's outputs are checked against explicit distributions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from tiny_models import load_reference_model, make_tiny_model, reference_greedy

from pagoda import LLM, SamplingParams
from pagoda.cli import build_parser
from pagoda.config import EngineConfig
from pagoda.engine.scheduler import ScheduledSequence
from pagoda.engine.sequence import Sequence
from pagoda.engine.spec_decode.adaptive import DraftLength
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.ngram import ngram_proposal
from pagoda.engine.spec_decode.rejection_sampler import rejection_sample
from pagoda.engine.step_inputs import build_step_inputs
from pagoda.entrypoints.metrics import ServerMetrics

MAX_NEW = 20
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same vocabulary, different weights and architecture: it proposes mostly wrong tokens."""
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2", seed=1, with_tokenizer=False)


@pytest.fixture(scope="module")
def reference(target: Path) -> dict[tuple[int, ...], list[int]]:
    """transformers' greedy continuations, memoised per prompt."""
    return {}


def expected(
    target: Path, cache: dict[tuple[int, ...], list[int]], prompts: list[list[int]]
) -> list[list[int]]:
    missing = [p for p in prompts if tuple(p) not in cache]
    if missing:
        model = load_reference_model(target)
        for p in missing:
            cache[tuple(p)] = reference_greedy(model, p, MAX_NEW)[0]
    return [cache[tuple(p)] for p in prompts]


def repetitive_prompts(n: int, seed: int, shared_prefix: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase, as input-grounded text does, so lookups find matches."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 256) for _ in range(shared_prefix)]
    prompts = []
    for _ in range(n):
        phrase = [rng.randrange(3, 256) for _ in range(rng.randint(2, 7))]
        prompts.append(prefix + phrase * rng.randint(1, 3) + phrase[: rng.randint(0, len(phrase))])
    return prompts


def generate(llm: LLM, prompts: list[list[int]], **params: object) -> list[list[int]]:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": MAX_NEW, "ignore_eos": True, **params})
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_blocks_held(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_config_is_validated_strictly() -> None:
    assert EngineConfig(speculative_config=json.dumps(NGRAM)).speculative_config == SpeculativeConfig(**NGRAM)
    # vLLM's defaults: one lookup bound sets the other, none looks for 5-grams; a model means draft_model
    one = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3})
    assert (one.prompt_lookup_min, one.prompt_lookup_max) == (3, 3)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    assert SpeculativeConfig.parse({"model": "/m", "num_speculative_tokens": 2}).method == "draft_model"
    bad = [
        ({**NGRAM, "num_lookahead": 3}, "unknown key"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "unknown method"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        ({**NGRAM, "num_speculative_tokens": 0}, ">= 1"),
        ({**NGRAM, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "must not exceed"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a model"),
        ({**NGRAM, "model": "/m"}, "takes no model"),
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
    ]
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(speculative_config={"model": "/m", "num_speculative_tokens": 2}, tensor_parallel_size=2)
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            EngineConfig(speculative_config=value)
    with pytest.raises(ValueError, match="unknown key"):
        LLM(speculative_config={**NGRAM, "bogus": 1})
    args = build_parser({}).parse_args(["serve", "--speculative-config", json.dumps(NGRAM)])
    assert SpeculativeConfig.parse(args.speculative_config) == SpeculativeConfig(**NGRAM)


def brute_force_ngram(tokens: list[int], lo: int, hi: int, k: int) -> list[int]:
    """The definition, spelled out: the largest n with an earlier match, its latest one, what followed."""
    for n in range(hi, lo - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == suffix]
        if starts:
            return tokens[starts[-1] + n : starts[-1] + n + k]
    return []


def test_ngram_proposal_matches_its_definition() -> None:
    rng = random.Random(0)
    for _ in range(500):
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 30))]
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, 5)
        k = rng.randint(1, 5)
        assert ngram_proposal(tokens, lo, hi, k) == brute_force_ngram(tokens, lo, hi, k), (tokens, lo, hi, k)


def test_draft_length_backs_off_when_proposals_miss() -> None:
    length = DraftLength(max_k=4)
    steps = [length.next() for _ in range(3)]
    assert steps == [4, 4, 4]
    length.update(4, 1)
    length.update(3, 0)
    length.update(2, 0)
    assert length.next() == 1
    proposed = 0
    for _ in range(200):  # nothing is ever accepted: proposals thin out to a few per hundred steps
        k = length.next()
        if k:
            proposed += 1
            length.update(k, 0)
    assert proposed <= 10  # pauses of 1, 2, 4, ... 64 steps
    length.pause = 0
    length.update(1, 1)
    length.update(2, 2)
    assert length.next() == 3


def test_greedy_ngram_equals_transformers_and_plain_decoding(target: Path, reference: dict) -> None:
    prompts = repetitive_prompts(12, seed=3)
    want = expected(target, reference, prompts)
    plain = LLM(model=str(target), block_size=4, max_model_len=96)
    assert generate(plain, prompts) == want
    llm = LLM(model=str(target), block_size=4, max_model_len=96, speculative_config=NGRAM)
    assert generate(llm, prompts) == want
    stats = llm.engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens > 0
    assert stats.spec_decode_num_draft_tokens > stats.spec_decode_num_accepted_tokens  # rejections too
    assert_no_blocks_held(llm)


def test_prefix_cache_hits_preemption_and_chunking_under_ngram(target: Path, reference: dict) -> None:
    prompts = repetitive_prompts(10, seed=5, shared_prefix=9)
    want = expected(target, reference, prompts)
    llm = LLM(model=str(target), block_size=4, max_model_len=64, speculative_config=NGRAM)
    assert generate(llm, prompts[:1]) == want[:1]
    before = llm.engine.get_stats().prefix_cache_hits
    assert generate(llm, prompts) == want
    assert llm.engine.get_stats().prefix_cache_hits - before >= 9 * 8
    assert_no_blocks_held(llm)
    tiny = LLM(
        model=str(target), block_size=4, max_model_len=64, num_gpu_blocks_override=14,
        max_num_batched_tokens=9, speculative_config=NGRAM,
    )
    assert generate(tiny, prompts) == want
    stats = tiny.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.spec_decode_num_accepted_tokens > 0
    assert_no_blocks_held(tiny)


@pytest.mark.parametrize("draft", ["same", "other"])
def test_greedy_draft_model_equals_transformers(
    draft: str, target: Path, other_draft: Path, reference: dict
) -> None:
    prompts = repetitive_prompts(8, seed=7, shared_prefix=5)
    want = expected(target, reference, prompts)
    model = target if draft == "same" else other_draft
    config = {"method": "draft_model", "model": str(model), "num_speculative_tokens": 3}
    # a tiny pool (preemption) and a small token budget (prompt chunks; proposals cut short)
    llm = LLM(model=str(target), block_size=4, max_model_len=64, num_gpu_blocks_override=16,
              max_num_batched_tokens=10, speculative_config=config)
    assert generate(llm, prompts) == want
    stats = llm.engine.get_stats()
    if draft == "same":  # the target drafting for itself: every proposal is right
        assert stats.spec_decode_num_accepted_tokens == stats.spec_decode_num_draft_tokens > 0
    else:
        assert stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens
    assert stats.num_preemptions > 0
    assert_no_blocks_held(llm)


def test_stops_and_max_tokens_cut_accepted_runs(target: Path, reference: dict) -> None:
    prompts = repetitive_prompts(6, seed=9)
    want = expected(target, reference, prompts)
    config = {"method": "draft_model", "model": str(target), "num_speculative_tokens": 4}
    llm = LLM(model=str(target), block_size=4, max_model_len=64, speculative_config=config)
    for max_tokens in (1, 2, 7):
        assert generate(llm, prompts, max_tokens=max_tokens) == [w[:max_tokens] for w in want]
    for prompt, full in zip(prompts, want, strict=True):
        stop = full[9]
        cut = full[: full.index(stop) + 1]
        assert generate(llm, [prompt], stop_token_ids=[stop]) == [cut]
    assert_no_blocks_held(llm)


def test_n_samples_seeds_penalties_and_logprobs_ride_along(target: Path, reference: dict) -> None:
    prompts = repetitive_prompts(4, seed=13)
    want = expected(target, reference, prompts)
    llm = LLM(model=str(target), block_size=4, max_model_len=64, num_gpu_blocks_override=30,
              speculative_config=NGRAM)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, n=2, logprobs=2)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=MAX_NEW, ignore_eos=True, n=3,
                             seed=4, repetition_penalty=1.1, presence_penalty=0.2)
    requests = [{"prompt_token_ids": p} for p in prompts]
    outputs = llm.generate(requests, [greedy, sampled] * 2, use_tqdm=False)
    plain = LLM(model=str(target), block_size=4, max_model_len=64)
    plain_outputs = plain.generate(requests[::2], greedy, use_tqdm=False)
    for output, reference_output, full in zip(outputs[::2], plain_outputs, want[::2], strict=True):
        for completion, plain_completion in zip(output.outputs, reference_output.outputs, strict=True):
            assert completion.token_ids == full
            assert completion.logprobs is not None and plain_completion.logprobs is not None
            for ours, theirs in zip(completion.logprobs, plain_completion.logprobs, strict=True):
                assert ours.keys() == theirs.keys()
                assert [ours[t] for t in ours] == pytest.approx([theirs[t] for t in ours], abs=1e-4)
    for output in outputs[1::2]:
        assert [len(c.token_ids) for c in output.outputs] == [MAX_NEW] * 3
    assert_no_blocks_held(llm)


def test_metrics_expose_vllm_spec_decode_counters(target: Path) -> None:
    llm = LLM(model=str(target), block_size=4, max_model_len=64, speculative_config=NGRAM)
    generate(llm, repetitive_prompts(3, seed=1))
    stats = llm.engine.get_stats()
    text = generate_latest(ServerMetrics("m", lambda: stats).registry).decode()
    for name, value in (
        ("num_drafts", stats.spec_decode_num_drafts),
        ("num_draft_tokens", stats.spec_decode_num_draft_tokens),
        ("num_accepted_tokens", stats.spec_decode_num_accepted_tokens),
    ):
        assert f'vllm:spec_decode_{name}_total{{model_name="m"}} {float(value)}' in text
    per_pos = stats.spec_decode_num_accepted_tokens_per_pos
    assert len(per_pos) == 4 and sum(per_pos) == stats.spec_decode_num_accepted_tokens > 0
    assert per_pos == sorted(per_pos, reverse=True)  # position j is accepted only after 0..j-1 were
    for position, count in enumerate(per_pos):
        line = f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{position}"}}'
        assert f"{line} {float(count)}" in text


def total_variation(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=probs.numel()).double()
    return 0.5 * float((counts / counts.sum() - probs.double()).abs().sum())


@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampling_follows_the_target_distribution(point_mass: bool) -> None:
    """Every emitted token, at every position, is distributed as the target's row there, however far the
    draft's distribution is from it. Rows do not depend on the prefix, so position j's token has law p_j
    among the runs that reach j. 8000 draws over 6 tokens put the TV distance near 0.01."""
    generator = torch.Generator().manual_seed(0)
    vocab, k, trials = 6, 3, 8000
    target = torch.softmax(torch.randn(k + 1, vocab, generator=generator) * 1.5, dim=-1)
    draft = torch.softmax(torch.randn(k, vocab, generator=generator) * 1.5, dim=-1)
    drafted = torch.multinomial(draft, trials, replacement=True, generator=generator).T.tolist()
    likeliest = [int(target[j].argmax()) for j in range(k)]  # a point-mass proposal: often kept, not always
    by_position: list[list[int]] = [[] for _ in range(k + 1)]
    for trial in range(trials):
        drafts, draft_probs = (likeliest, None) if point_mass else (drafted[trial], draft)
        for j, token in enumerate(rejection_sample(target, drafts, draft_probs, generator)):
            by_position[j].append(token)
    assert len(by_position[1]) >= 1000  # drafts were kept, so later positions are checked too
    for j in range(k + 1):
        if len(by_position[j]) >= 1000:
            assert total_variation(by_position[j], target[j]) < 0.04, j
    # the test can fail: what was proposed is far from the target
    proposed = [likeliest[0]] * trials if point_mass else [d[0] for d in drafted]
    assert total_variation(proposed, target[0]) > 0.2


def test_sampled_drafts_from_the_target_itself_are_all_kept(target: Path) -> None:
    """A draft model equal to the target draws from q = p, so min(1, p/q) keeps (nearly: p and q come
    from different batch shapes) every draft: a misaligned or mis-warped q would reject many."""
    config = {"method": "draft_model", "model": str(target), "num_speculative_tokens": 3}
    llm = LLM(model=str(target), block_size=4, max_model_len=64, speculative_config=config)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_tokens=MAX_NEW, ignore_eos=True, n=2,
                            seed=3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in repetitive_prompts(4, seed=2)], params,
                           use_tqdm=False)
    assert all(len(c.token_ids) == MAX_NEW for o in outputs for c in o.outputs)
    stats = llm.engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens >= 0.9 * stats.spec_decode_num_draft_tokens > 0
    assert_no_blocks_held(llm)


def test_proposals_are_scheduled_like_a_chunk_with_a_row_each() -> None:
    seq = Sequence([11, 12, 13], SamplingParams(), block_size=4)
    seq.block_table, seq.num_computed_tokens, seq.spec_token_ids = [5, 6], 2, [17, 18]
    item = ScheduledSequence.of(seq, 3)
    assert (item.num_spec_tokens, item.samples) == (2, True)
    inputs, _ = build_step_inputs([item], block_size=4)
    assert inputs.input_ids == [13, 17, 18] and inputs.positions == [2, 3, 4]
    assert inputs.slots == [22, 23, 24] and inputs.seq_lens == [5] and inputs.logit_rows == [0, 1, 2]


def test_rejected_proposals_hold_no_blocks_between_steps(target: Path, reference: dict) -> None:
    prompts = repetitive_prompts(6, seed=21)
    want = expected(target, reference, prompts)
    llm = LLM(model=str(target), block_size=2, max_model_len=64, speculative_config=NGRAM)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output.outputs[0].token_ids
        for seq in engine.scheduler.running:  # blocks for its computed tokens, at most one more (2 per block)
            held = len(seq.block_table)
            assert seq.blocks_needed(seq.num_tokens - 1) <= held <= seq.blocks_needed(seq.num_tokens)
            assert seq.num_computed_tokens == seq.num_tokens - 1
    assert [done[str(i)] for i in range(len(prompts))] == want
    stats = engine.get_stats()
    assert stats.spec_decode_num_draft_tokens > stats.spec_decode_num_accepted_tokens > 0
    assert_no_blocks_held(llm)
