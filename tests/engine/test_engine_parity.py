"""End to end through `LLM.generate`: greedy tokens equal transformers', however the engine batches.

Each case runs many prompts of different lengths in one engine, then forces the paths that could go
wrong: prefix-cache hits, preemption under a tiny KV pool, and chunked prefill under a tiny token budget.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tiny_models import TINY_ARCHS, load_reference_model, make_tiny_model, reference_greedy

from pagoda import LLM, SamplingParams

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in TINY_ARCHS}


def random_prompts(n: int, seed: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 256) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 256) for _ in range(rng.randint(1, 23))] for _ in range(n)]


def expected(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = load_reference_model(path)
    return [reference_greedy(model, p, MAX_NEW)[0] for p in prompts]


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_blocks_held(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0 and stats.num_waiting == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_greedy_equals_transformers(arch: str, model_dirs: dict[str, Path]) -> None:
    prompts = random_prompts(6, seed=TINY_ARCHS.index(arch))
    llm = LLM(model=str(model_dirs[arch]), block_size=4, max_model_len=64)
    assert generate(llm, prompts) == expected(model_dirs[arch], prompts)
    assert_no_blocks_held(llm)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3", "qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_prefix_cache_hits_preserve_outputs(arch: str, model_dirs: dict[str, Path]) -> None:
    prompts = random_prompts(5, seed=7, shared_prefix=13)
    llm = LLM(model=str(model_dirs[arch]), block_size=4, max_model_len=64)
    want = expected(model_dirs[arch], prompts)
    assert generate(llm, prompts[:1]) == want[:1]
    before = llm.engine.get_stats().prefix_cache_hits
    assert generate(llm, prompts) == want
    assert llm.engine.get_stats().prefix_cache_hits - before >= 4 * 12  # each reuses 3 blocks of the prefix
    assert_no_blocks_held(llm)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "mixtral", "gpt_oss", "deepseek_v2"])
def test_preemption_under_a_tiny_pool_preserves_outputs(arch: str, model_dirs: dict[str, Path]) -> None:
    prompts = random_prompts(8, seed=11)
    llm = LLM(model=str(model_dirs[arch]), block_size=4, max_model_len=40, num_gpu_blocks_override=10)
    assert generate(llm, prompts) == expected(model_dirs[arch], prompts)
    assert llm.engine.get_stats().num_preemptions > 0
    assert_no_blocks_held(llm)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_chunked_prefill_preserves_outputs(arch: str, model_dirs: dict[str, Path]) -> None:
    prompts = random_prompts(6, seed=5, shared_prefix=9)
    llm = LLM(model=str(model_dirs[arch]), block_size=4, max_model_len=64, max_num_batched_tokens=7,
              enable_prefix_caching=False)
    assert generate(llm, prompts) == expected(model_dirs[arch], prompts)
    assert_no_blocks_held(llm)


def test_requests_that_can_never_fit_are_rejected_up_front(model_dirs: dict[str, Path]) -> None:
    llm = LLM(model=str(model_dirs["llama"]), block_size=4, max_model_len=32, num_gpu_blocks_override=6)
    with pytest.raises(ValueError, match="maximum context length is 32"):
        llm.generate([{"prompt_token_ids": [5] * 30}], SamplingParams(max_tokens=5), use_tqdm=False)
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate([{"prompt_token_ids": [5] * 20}], SamplingParams(max_tokens=5), use_tqdm=False)
    assert_no_blocks_held(llm)
