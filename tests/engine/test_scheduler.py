"""Continuous batching against a deterministic stand-in for the model's sampling.

The "model" here is a pure function of the full token history, so a request's output is fixed no
matter how it is batched, chunked or preempted: any scheduling bug that drops, repeats or reorders
tokens changes the output.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.block_manager import BlockManager
from pagoda.engine.scheduler import Scheduler
from pagoda.engine.sequence import Sequence
from pagoda.sampling_params import SamplingParams

BS = 4


def next_token(history: list[int]) -> int:
    return (sum(history) * 31 + len(history)) % 97


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def run(scheduler: Scheduler, seqs: list[Sequence], budget: int, max_seqs: int, abort_step: int = -1) -> int:
    """Drive the scheduler to completion the way the engine does; returns the number of steps.

    At `abort_step`, the oldest running sequence is aborted, as a client disconnect would.
    """
    for s in seqs:
        scheduler.add(s)
    steps = 0
    while scheduler.has_unfinished:
        if steps == abort_step and scheduler.running:
            scheduler.finish(scheduler.running[0], "abort")
            steps += 1
            continue
        batch = scheduler.schedule()
        assert batch, "the scheduler stalled with work left"
        assert sum(item.num_new_tokens for item in batch) <= budget
        assert len(scheduler.running) <= max_seqs
        for item in batch:
            s = item.seq
            assert len(s.block_table) * BS >= s.num_computed_tokens + item.num_new_tokens
            s.num_computed_tokens += item.num_new_tokens
            if item.samples:
                s.append_token(next_token(s.token_ids))
                if s.num_completion_tokens == s.params.max_tokens:
                    scheduler.finish(s, "length")
        steps += 1
        assert steps < 10_000
    return steps


def test_decodes_are_batched_and_requests_retire_at_once() -> None:
    bm = BlockManager(64, BS)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Sequence([1 + i] * (3 + i), SamplingParams(max_tokens=2 + 3 * i), BS) for i in range(4)]
    for s in seqs:
        scheduler.add(s)
    first = scheduler.schedule()
    assert [item.num_new_tokens for item in first] == [3, 4, 5, 6]  # all prefills in one step
    for item in first:
        item.seq.num_computed_tokens += item.num_new_tokens
        item.seq.append_token(0)
    second = scheduler.schedule()
    assert [item.num_new_tokens for item in second] == [1, 1, 1, 1]  # then one batched decode


def test_long_prompts_are_chunked_and_mixed_with_decodes() -> None:
    bm = BlockManager(64, BS)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    short = Sequence([5, 6], SamplingParams(max_tokens=20), BS)
    scheduler.add(short)
    batch = scheduler.schedule()
    short.num_computed_tokens += batch[0].num_new_tokens
    short.append_token(1)
    long = Sequence(list(range(30)), SamplingParams(max_tokens=3), BS)
    scheduler.add(long)
    batch = scheduler.schedule()
    assert [(item.seq is short, item.num_new_tokens) for item in batch] == [(True, 1), (False, 7)]
    assert not batch[1].samples  # a partial prefill samples nothing


def test_preemption_frees_the_newest_and_outputs_are_unchanged() -> None:
    bm = BlockManager(10, BS)  # 40 token slots for 4 requests that need 20 each
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=32)
    prompts = [[i, i + 1, i + 2, i + 3, i + 4] for i in range(4)]
    seqs = [Sequence(p, SamplingParams(max_tokens=15), BS) for p in prompts]
    run(scheduler, seqs, 32, 4)
    assert scheduler.num_preemptions > 0
    for s, p in zip(seqs, prompts):
        assert s.completion_token_ids == reference(p, 15)
    assert bm.num_free_blocks == bm.num_blocks


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=1, max_size=20), st.integers(1, 12)),
             min_size=1, max_size=8),
    st.integers(8, 30),
    st.integers(1, 40),
    st.integers(1, 6),
    st.integers(0, 12),
    st.integers(0, 15),
)
def test_random_workloads_finish_correctly_without_leaks(
    requests: list, num_blocks: int, budget: int, max_seqs: int, abort_at: int, abort_step: int
) -> None:
    # every request must fit the pool on its own, as add_request guarantees
    requests = [(p, m) for p, m in requests if (len(p) + m + BS - 1) // BS <= num_blocks]
    bm = BlockManager(num_blocks, BS)
    scheduler = Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    seqs = [Sequence(p, SamplingParams(max_tokens=m), BS) for p, m in requests]
    if seqs and abort_at < len(seqs):
        scheduler.add(seqs[abort_at])
        scheduler.finish(seqs[abort_at], "abort")  # aborted while waiting
        seqs.pop(abort_at)
        requests.pop(abort_at)
    run(scheduler, seqs, budget, max_seqs, abort_step)
    for s, (p, m) in zip(seqs, requests):
        if s.finish_reason == "abort":
            assert s.completion_token_ids == reference(p, m)[: s.num_completion_tokens]
        else:
            assert s.completion_token_ids == reference(p, m)
    assert bm.num_free_blocks == num_blocks and not scheduler.running and not scheduler.waiting
