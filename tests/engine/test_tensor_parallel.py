"""Tensor parallelism on the CPU over gloo, with two ranks: rank 0 in the test process, one spawned worker.

Greedy outputs must equal transformers' and the single-process engine's, token for token, while the
batch preempts and chunks its prefills (so the ranks' block tables really move); a worker that dies must
fail the engine with a clear error instead of hanging it; and however the engine ends (closed, collected,
or its process killed), no worker process outlives it.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tiny_models import load_reference_model, make_tiny_model, reference_greedy

from pagoda import LLM, SamplingParams
from pagoda.distributed.workers import TensorParallelWorkers, WorkerFailedError
from pagoda.engine.step_inputs import StepInputs
from pagoda.outputs import CompletionOutput

MAX_NEW = 6
TP = 2
# a pool too small for the batch (preemption) and a token budget under the prompt lengths (chunked prefill)
ENGINE_OPTIONS = {
    "block_size": 4,
    "max_model_len": 40,
    "num_gpu_blocks_override": 14,
    "max_num_batched_tokens": 16,
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-tp")
    # llama: 2 KV heads, one per rank; qwen2: q/k/v biases; qwen3: 1 KV head, replicated on both ranks
    return {arch: make_tiny_model(arch, root / arch) for arch in ("llama", "qwen2", "qwen3", "deepseek_v3")}


def random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(1, 23))] for _ in range(n)]


def greedy(llm: LLM, prompts: list[list[int]], logprobs: int | None = None) -> list[CompletionOutput]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=logprobs)
    return [
        o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ]


def child_pids() -> set[int]:
    """Live children of this process, without multiprocessing's resource tracker: Python starts that
    helper once per process, with the first spawned process, and keeps it until exit."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids |= {int(p) for p in (task / "children").read_text().split()}
        except FileNotFoundError:  # a thread that ended since the listing (torch's, the tokenizer's)
            continue
    return {p for p in pids if is_alive(p) and b"resource_tracker" not in _cmdline(p)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def is_alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def shm_entries() -> set[str]:
    # torch's shared tensors, multiprocessing's shared memory and semaphores
    return {n for n in os.listdir("/dev/shm") if n.startswith(("torch_", "psm_", "sem.mp-"))}


@pytest.fixture
def start_tp_llm() -> Iterator[Callable[..., LLM]]:
    """Starts tensor-parallel engines; afterwards checks that none left a process or shared memory behind.

    Engines a failed test leaves open are closed first, so one failure does not leak into the next test;
    only weak references are kept, so that a test can still let the garbage collector stop an engine.
    """
    children, shm = child_pids(), shm_entries()
    started: list[weakref.ref[TensorParallelWorkers]] = []

    def start(path: Path, **options: object) -> LLM:
        llm = LLM(model=str(path), tensor_parallel_size=TP, **options)
        started.append(weakref.ref(llm.engine.runner.workers))
        return llm

    yield start
    for ref in started:
        if (workers := ref()) is not None:
            workers.close()
    assert child_pids() <= children, "a worker process outlived its engine"
    assert shm_entries() <= shm, "shared memory leaked"


# deepseek_v3: MLA's heads, the experts' and the shared expert's intermediate slices, a dense layer
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "deepseek_v3"])
def test_greedy_tp2_equals_transformers_and_tp1(
    arch: str, model_dirs: dict[str, Path], start_tp_llm: Callable[..., LLM]
) -> None:
    path = model_dirs[arch]
    prompts = random_prompts(8, seed=len(arch))
    reference = load_reference_model(path)
    want = [reference_greedy(reference, p, MAX_NEW) for p in prompts]
    single = greedy(LLM(model=str(path), **ENGINE_OPTIONS), prompts)

    llm = start_tp_llm(path, **ENGINE_OPTIONS)
    worker_pids = llm.engine.runner.workers.pids
    assert len(worker_pids) == TP - 1 and all(is_alive(p) for p in worker_pids)
    attn = llm.engine.runner.model.model.layers[0].self_attn
    spec = llm.engine.runner.spec
    assert attn.num_heads == spec.num_heads // TP  # really sharded
    if spec.mla is None:  # MLA's one latent serves every head
        assert attn.num_kv_heads == max(1, spec.num_kv_heads // TP)
    if spec.moe is not None:  # every rank holds a slice of every expert
        experts = llm.engine.runner.model.model.layers[-1].mlp.experts
        moe = spec.moe
        assert experts.w13.shape == (moe.num_experts, 2 * moe.intermediate_size // TP, spec.hidden_size)
    outputs = greedy(llm, prompts, logprobs=0)

    assert [o.token_ids for o in outputs] == [tokens for tokens, _ in want]
    assert [o.token_ids for o in outputs] == [o.token_ids for o in single]
    assert llm.engine.get_stats().num_preemptions > 0
    for output, (tokens, logits) in zip(outputs, want):
        expected = torch.log_softmax(logits, dim=-1)[range(len(tokens)), tokens]
        got = torch.tensor([entry[t] for entry, t in zip(output.logprobs, tokens)])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    if arch == "qwen3":  # garbage collection stops the workers too
        del llm, attn
        gc.collect()
    else:
        llm.engine.close()
    assert not any(is_alive(p) for p in worker_pids)


@pytest.mark.parametrize("when", ["between steps", "during a step"])
def test_a_killed_worker_fails_the_engine(
    when: str, model_dirs: dict[str, Path], start_tp_llm: Callable[..., LLM]
) -> None:
    llm = start_tp_llm(model_dirs["llama"], **ENGINE_OPTIONS)
    runner = llm.engine.runner
    (worker,) = runner.workers.pids
    prompts = random_prompts(3, seed=1)
    greedy(llm, prompts)  # healthy first
    if when == "between steps":
        os.kill(worker, signal.SIGKILL)
    else:
        run = runner.run

        def kill_then_run(inputs: StepInputs) -> torch.Tensor | None:
            os.kill(worker, signal.SIGKILL)  # rank 0 then waits for it in the step's first collective
            return run(inputs)

        runner.run = kill_then_run
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match=rf"worker 1 \(pid {worker}\) was killed by SIGKILL"):
        greedy(llm, prompts)
    with pytest.raises(WorkerFailedError, match="killed by SIGKILL"):  # and stays failed
        llm.engine.step()
    assert time.monotonic() - start < 30
    llm.engine.close()


def test_killing_the_engine_process_stops_its_workers(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    script = tmp_path / "engine.py"
    script.write_text(
        "import time\n"
        "from pagoda import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(model={str(model_dirs['qwen2'])!r}, tensor_parallel_size={TP}, max_model_len=40)\n"
        "    print(*llm.engine.runner.workers.pids, flush=True)\n"
        "    time.sleep(600)\n"
    )
    engine = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker_pids = [int(p) for p in engine.stdout.readline().split()]
        assert len(worker_pids) == TP - 1 and all(is_alive(p) for p in worker_pids)
    finally:
        engine.kill()  # no atexit, no finalizers: only the workers' own watch on their pipe
        engine.wait()
    deadline = time.monotonic() + 20
    while any(is_alive(p) for p in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_alive(p) for p in worker_pids)


def test_an_unshardable_model_is_refused_before_any_worker_starts(model_dirs: dict[str, Path]) -> None:
    children = child_pids()
    with pytest.raises(ValueError, match="its 4 attention heads do not split into 3"):
        LLM(model=str(model_dirs["llama"]), tensor_parallel_size=3, max_model_len=40)
    assert child_pids() == children
