"""Asynchronous scheduling (`async_scheduling=True`, `engine/run_ahead.py`): each decode step is launched from
the last step's tokens before the host reads them, a guess that the batch does not change.

On by default only with CUDA graphs (tests/engine/test_cuda.py runs it there); here it is forced on the CPU,
where the same guesses are taken or dropped in the same places: greedy tokens must still be transformers',
while sequences end at different steps (by length and by stop token), requests arrive mid-stream,
sequences are preempted, and every KV block comes back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import load_reference_model, make_tiny_model, one_torch_thread, reference_greedy

from pagoda import LLM, SamplingParams
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.run_ahead import RunAhead
from pagoda.outputs import RequestOutput


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> torch.nn.Module:
    return load_reference_model(model_dir)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(2, 20))] for _ in range(n)]


def engine(model_dir: Path, **options: object) -> LLMEngine:
    llm = LLM(model=str(model_dir), device="cpu", dtype="float32", block_size=4, max_model_len=64,
              async_scheduling=True, **options)
    return llm.engine


def run_ahead(eng: LLMEngine) -> RunAhead:
    assert eng.runner.run_ahead is not None
    return eng.runner.run_ahead


Arrivals = dict[int, list[tuple[str, list[int], SamplingParams]]]


def drain(eng: LLMEngine, arrivals: Arrivals) -> dict[str, list[int]]:
    """Step the engine to the end, adding `arrivals[k]` before step k; the finished requests' tokens."""
    done: dict[str, list[int]] = {}
    step = 0
    while eng.has_unfinished_requests() or any(k >= step for k in arrivals):
        for request_id, prompt, params in arrivals.get(step, []):
            eng.add_request(request_id, prompt, params)
        outputs: list[RequestOutput] = eng.step()
        done.update({o.request_id: o.outputs[0].token_ids for o in outputs if o.finished})
        step += 1
    assert eng.get_stats().kv_cache_usage == 0.0  # every block back, the guessed steps' included
    return done


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)  # type: ignore[arg-type]


def test_greedy_equals_transformers_as_batches_change(model_dir: Path, reference: torch.nn.Module) -> None:
    batch = prompts(6, seed=1)
    lengths = [3, 17, 9, 12, 5, 14]  # sequences end at different steps: the guess keeps the others' rows
    want = {f"r{i}": reference_greedy(reference, p, n)[0] for i, (p, n) in enumerate(zip(batch, lengths))}
    # one request stops on a token the model emits midway (the host sees it a step late)
    stop_at = want["r1"][6]
    want["r1"] = want["r1"][: want["r1"].index(stop_at) + 1]
    arrivals = {
        0: [(f"r{i}", batch[i], greedy(lengths[i])) for i in range(3)],
        4: [("r3", batch[3], greedy(lengths[3]))],  # admissions mid-stream drop the guess
        9: [(f"r{i}", batch[i], greedy(lengths[i])) for i in (4, 5)],
    }
    arrivals[0][1] = ("r1", batch[1], greedy(lengths[1], stop_token_ids=[stop_at]))
    eng = engine(model_dir)
    assert drain(eng, arrivals) == want
    ahead = run_ahead(eng)
    assert ahead.num_taken > 10 and ahead.num_discarded >= 1


def test_preemption_under_a_tiny_pool(model_dir: Path, reference: torch.nn.Module) -> None:
    batch = prompts(8, seed=2)
    want = {f"r{i}": reference_greedy(reference, p, 10)[0] for i, p in enumerate(batch)}
    eng = engine(model_dir, num_gpu_blocks_override=14)
    assert drain(eng, {0: [(f"r{i}", p, greedy(10)) for i, p in enumerate(batch)]}) == want
    assert eng.get_stats().num_preemptions > 0 and run_ahead(eng).num_taken > 0


def test_rows_whose_sampling_reads_the_last_token_run_in_step(model_dir: Path) -> None:
    """Seeded, penalised and logprobs rows are never guessed: their outputs equal synchronous steps'."""
    batch = prompts(3, seed=3)
    kinds = [
        SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, logprobs=2, max_tokens=12, ignore_eos=True),
    ]
    outputs, llms = {}, {}
    for on in (True, False):
        llms[on] = LLM(model=str(model_dir), device="cpu", dtype="float32", block_size=4, async_scheduling=on)
        result = llms[on].generate([{"prompt_token_ids": p} for p in batch], kinds, use_tqdm=False)
        outputs[on] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in result]
    assert outputs[True] == outputs[False]
    assert run_ahead(llms[True].engine).num_taken == 0


def test_unseeded_sampling_runs_ahead(model_dir: Path) -> None:
    eng = engine(model_dir)
    params = SamplingParams(temperature=1.0, top_p=0.9, n=3, max_tokens=16, ignore_eos=True)
    done = drain(eng, {0: [("a", prompts(1, seed=4)[0], params)]})
    # every decode step was a guess taken, block boundaries included (the scheduler reserved the slots)
    assert len(done["a"]) == 16 and (run_ahead(eng).num_taken, run_ahead(eng).num_discarded) == (15, 0)


def test_defaults_and_what_it_refuses(model_dir: Path) -> None:
    assert LLM(model=str(model_dir), device="cpu").engine.runner.run_ahead is None  # no CUDA graphs
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM(model=str(model_dir), device="cpu", async_scheduling=True,
            speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
