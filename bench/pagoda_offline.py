"""Pagoda through its offline API: throughput, and KV-cache efficiency from the engine's block accounting."""

from __future__ import annotations

import time
from typing import Any

from bench.env import peak_rss_bytes
from bench.workloads import Workload


def _sampling_params(output_len: int) -> Any:
    from pagoda import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def _load(engine_options: dict[str, Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    from pagoda import LLM

    llm = LLM(**engine_options)
    return llm, time.perf_counter() - start


def _warm_up(llm: Any) -> None:
    """A few short requests, so that one-off costs (first kernels, allocations) stay out of the timing."""
    llm.generate([[1, 2, 3, 4, 5, 6, 7, 8]] * 4, _sampling_params(4), use_tqdm=False)


def throughput(workload: Workload, engine_options: dict[str, Any]) -> dict[str, Any]:
    """All requests at once through `LLM.generate`: the engine batches them continuously."""
    llm, load_seconds = _load(engine_options)
    _warm_up(llm)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    params = [_sampling_params(r.output_len) for r in workload.requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    produced = [len(o.outputs[0].token_ids) for o in outputs]
    return {
        "load_seconds": load_seconds,
        "wall_seconds": wall,
        "num_requests": len(workload.requests),
        "prompt_tokens": workload.num_prompt_tokens,
        "output_tokens": sum(produced),
        "requested_output_tokens": workload.num_output_tokens,
        "output_tokens_match": produced == [r.output_len for r in workload.requests],
        "output_tokens_per_s": sum(produced) / wall,
        "total_tokens_per_s": (sum(produced) + workload.num_prompt_tokens) / wall,
        "requests_per_s": len(produced) / wall,
        "peak_rss_bytes": peak_rss_bytes(),
    }


class KVSampler:
    """After every engine step: the KV slots the paged pool holds against what reservation would hold.

    Paged: allocated = blocks in use x block size. Reserving the maximum length (what a contiguous
    KV cache must do when it cannot know the output length): max_model_len per running sequence.
    Reserving prompt + max_tokens (an oracle that knows each request's budget): that sum. The real
    tokens are those whose K/V sit in the cache (computed tokens of the running sequences).
    """

    def __init__(self, engine: Any, max_model_len: int) -> None:
        self.engine = engine
        self.max_model_len = max_model_len
        self.steps = 0
        self.real = 0
        self.paged = 0
        self.reserve_max = 0
        self.reserve_request = 0
        self.running_counts: list[int] = []

    def sample(self) -> None:
        running = self.engine.scheduler.running
        if not running:
            return
        bm = self.engine.block_manager
        self.steps += 1
        self.real += sum(seq.num_computed_tokens for seq in running)
        self.paged += (bm.num_blocks - bm.num_free_blocks) * bm.block_size
        self.reserve_max += len(running) * self.max_model_len
        self.reserve_request += sum(seq.num_prompt_tokens + seq.params.max_tokens for seq in running)
        self.running_counts.append(len(running))

    def utilization(self) -> dict[str, float]:
        """Share of allocated slots that hold real tokens, summed over all steps."""
        return {
            "paged": self.real / self.paged,
            "reserve_max_model_len": self.real / self.reserve_max,
            "reserve_prompt_plus_max_tokens": self.real / self.reserve_request,
        }


def kv_accounting(
    workload: Workload, engine_options: dict[str, Any], budget_blocks: int
) -> dict[str, Any]:
    """Run the workload with a KV pool of `budget_blocks` blocks and watch the block accounting.

    The pool is small on purpose: then memory, not the sequence cap, limits how many sequences run
    at once, which is the number to compare with `budget // max_model_len` for max-length reservation.
    Prefix caching is off so that shared blocks cannot flatter the paged figures.
    """
    options = {**engine_options, "num_gpu_blocks_override": budget_blocks, "enable_prefix_caching": False}
    llm, _ = _load(options)
    engine = llm.engine
    sampler = KVSampler(engine, engine.max_model_len)
    for i, request in enumerate(workload.requests):
        engine.add_request(f"kv-{i}", list(request.prompt_token_ids), _sampling_params(request.output_len))
    while engine.has_unfinished_requests():
        engine.step()
        sampler.sample()
    block_size = engine.config.block_size
    budget_tokens = budget_blocks * block_size
    counts = sampler.running_counts
    utilization = sampler.utilization()
    return {
        "block_size": block_size,
        "max_model_len": engine.max_model_len,
        "budget_tokens": budget_tokens,
        "num_requests": len(workload.requests),
        "steps": sampler.steps,
        "utilization": utilization,
        "waste": {k: 1.0 - v for k, v in utilization.items()},
        "concurrent_sequences": {
            "paged_mean": sum(counts) / len(counts),
            "paged_peak": max(counts),
            "reserve_max_model_len": budget_tokens // engine.max_model_len,
            "reserve_prompt_plus_max_tokens_mean": _mean_fit(workload, budget_tokens),
        },
        "num_preemptions": engine.scheduler.num_preemptions,
    }


def _mean_fit(workload: Workload, budget_tokens: int) -> float:
    """Average number of requests whose full reservations fit the budget, taken in arrival order."""
    sizes = [r.prompt_len + r.output_len for r in workload.requests]
    fits = []
    for start in range(len(sizes)):
        used, n = 0, 0
        for size in sizes[start:]:
            if used + size > budget_tokens:
                fits.append(n)  # only windows that the budget cut short: the tail would undercount
                break
            used, n = used + size, n + 1
    return sum(fits) / len(fits) if fits else float(len(sizes))
