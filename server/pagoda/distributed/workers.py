"""Rank 0's handle on the other tensor-parallel ranks: it spawns them, sends them each step, and notices
when one dies.

Rank 0 lives in the engine process, so the scheduler drives it directly; ranks 1..N-1 are spawned
processes (`worker_main`). Each step rank 0 sends the flat batch (`StepInputs`) down every worker's pipe,
then all ranks run the same forward and meet in its collectives. The pipes carry the steps rather than a
collective broadcast so that an idle worker waits without a timeout, and so that a worker whose engine
process is gone reads end-of-file and exits. A dead worker breaks the collectives of the step in flight
(gloo reports the closed connection) or is seen before the next one; either way the step raises
`WorkerFailedError`, and the engine stays failed. One that dies while the engine is idle is seen by the
engine's idle watch (`check_alive`) and by the liveness probe (`all_alive`), without waiting for a step.
"""

from __future__ import annotations

import contextlib
import pickle
import signal
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import NoReturn, TypeVar, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagoda.config import EngineConfig
from pagoda.distributed.parallel_state import (
    COLLECTIVE_TIMEOUT,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from pagoda.distributed.worker_main import (
    FAILED,
    JOINING,
    READY,
    STOP,
    cpu_threads_per_rank,
    worker_main,
)
from pagoda.engine.step_inputs import StepInputs
from pagoda.models.spec import ModelSpec

T = TypeVar("T")

STOP_GRACE_SECONDS = 5.0  # how long a worker may take to exit on its own before it is terminated
DEATH_NOTICE_SECONDS = 5.0  # after a failed collective, how long to wait for the worker that caused it


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died or raised; the engine cannot step any more."""


def check_shardable(spec: ModelSpec, size: int) -> None:
    """Fail before spawning anything if the model cannot be split over `size` ranks."""
    problems = []
    if spec.num_heads % size:
        problems.append(f"its {spec.num_heads} attention heads do not split into {size}")
    if spec.num_kv_heads % size and size % spec.num_kv_heads:
        problems.append(f"its {spec.num_kv_heads} KV heads neither split into {size} nor divide {size}")
    if spec.intermediate_size % size:
        problems.append(f"its MLP size {spec.intermediate_size} does not split into {size}")
    if problems:
        raise ValueError(f"tensor_parallel_size {size} cannot shard this model: {'; '.join(problems)}")


def start_workers(config: EngineConfig, spec: ModelSpec, max_model_len: int) -> TensorParallelWorkers | None:
    """The other ranks of a tensor-parallel engine, started and joined with this process as rank 0;
    None for a single-process engine."""
    if config.tensor_parallel_size == 1:
        return None
    check_shardable(spec, config.tensor_parallel_size)
    return TensorParallelWorkers(config, max_model_len)


class TensorParallelWorkers:
    def __init__(self, config: EngineConfig, max_model_len: int) -> None:
        size = config.tensor_parallel_size
        device = config.torch_device
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(
                f"tensor_parallel_size {size} needs {size} GPUs, but {torch.cuda.device_count()} are visible"
            )
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(size))
        # port 0: the OS picks a free port, and the workers learn it from their arguments
        store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT
        )
        context = mp.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self.error: WorkerFailedError | None = None
        # runs on close(), when the engine is garbage-collected, or at interpreter exit
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns)
        for rank in range(1, size):
            parent_end, child_end = context.Pipe()
            proc = context.Process(
                target=worker_main,
                args=(config, max_model_len, rank, store.port, child_end),
                name=f"pagoda-tp-worker-{rank}",
                daemon=True,
            )
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        # Joining blocks until every rank has joined: first make sure that every worker got that far.
        self._wait_for_all(JOINING)
        self._guarded(lambda: init_tensor_parallel(store, 0, size, device))

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    def wait_until_ready(self) -> None:
        """Block until every worker has loaded its shard and sized its KV pool, or raise why one could not."""
        self._wait_for_all(READY)

    def _wait_for_all(self, expected: str) -> None:
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
            wait([conn, proc.sentinel])  # a message, or the worker's death (then recv reads end-of-file)
            try:
                kind, message = self._receive(rank)
            except WorkerFailedError as error:
                self._fail(error)
            if kind != expected:
                self._fail(WorkerFailedError(f"tensor-parallel worker {rank} failed to start:\n{message}"))

    @property
    def all_alive(self) -> bool:
        """No worker has exited and no step has failed. Cheap, and safe from any thread even while a step
        runs: it only polls the workers' exit sentinels, and neither reads a pipe nor reaps a process
        (`check_alive`, on the engine's own thread, does that)."""
        return self.error is None and not wait([proc.sentinel for proc in self._procs], timeout=0)

    def check_alive(self) -> None:
        """Raise `WorkerFailedError`, saying how the worker died, once one has; the engine's thread calls
        this before each step, and while idle so that a death is noticed before the next request."""
        if self.error is not None:
            raise self.error
        dead = [rank for rank, proc in enumerate(self._procs, start=1) if not proc.is_alive()]
        if dead:
            self._fail(self._describe_death(dead[0]))

    def run_step(self, run: Callable[[StepInputs], T], inputs: StepInputs) -> T:
        """Send the step to every worker, then run rank 0's share of it with `run`."""
        self.check_alive()
        payload = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)

        def send_and_run() -> T:
            for conn in self._conns:
                conn.send_bytes(payload)
            return run(inputs)

        return self._guarded(send_and_run)

    def close(self) -> None:
        self._finalizer()

    def _guarded(self, call: Callable[[], T]) -> T:
        """Run rank 0's part of a group operation. Any failure leaves the ranks out of step (some wait in a
        collective the others left), so it fails the group for good: the worker's error when a worker
        caused it, else rank 0's own."""
        try:
            return call()
        except BaseException as error:
            culprit = self._culprit() if isinstance(error, Exception) else None  # not on Ctrl-C
            if culprit is not None:
                self._fail(culprit, error)
            self.error = WorkerFailedError(f"an earlier tensor-parallel step failed on rank 0: {error!r}")
            self.close()
            raise

    def _culprit(self) -> WorkerFailedError | None:
        """The worker whose death or error broke the collective, once it shows (gloo may report the
        closed connection before the worker's process is gone)."""
        watched: dict[Connection | int, int] = {  # pipes and exit sentinels
            **{conn: rank for rank, conn in enumerate(self._conns, start=1)},
            **{proc.sentinel: rank for rank, proc in enumerate(self._procs, start=1)},
        }
        for ready in wait(list(watched), timeout=DEATH_NOTICE_SECONDS):
            rank = watched[cast(Connection | int, ready)]  # one of the objects passed in
            try:
                kind, message = self._receive(rank)
            except WorkerFailedError as error:
                return error
            if kind == FAILED:
                return WorkerFailedError(f"tensor-parallel worker {rank} failed:\n{message}")
        return None

    def _receive(self, rank: int) -> tuple[str, str | None]:
        """The next message of worker `rank`; its death, described, if it can send none."""
        try:
            return self._conns[rank - 1].recv()
        except (EOFError, OSError):
            raise self._describe_death(rank) from None

    def _describe_death(self, rank: int) -> WorkerFailedError:
        proc = self._procs[rank - 1]
        proc.join(DEATH_NOTICE_SECONDS)
        code = proc.exitcode
        if code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
            if code == -signal.SIGKILL:
                how += " (the kernel's out-of-memory killer sends that one)"
        else:
            how = f"exited with code {code} (its log above says why)"
        return WorkerFailedError(
            f"tensor-parallel worker {rank} (pid {proc.pid}) {how}; the engine cannot go on without it and "
            "must be restarted"
        )

    def _fail(self, error: WorkerFailedError, cause: BaseException | None = None) -> NoReturn:
        self.error = error
        self.close()
        raise error from cause


def _stop_workers(procs: list[BaseProcess], conns: list[Connection]) -> None:
    """Stop every worker and reap it: asked politely, then terminated, then killed."""
    for conn in conns:
        with contextlib.suppress(OSError):  # else that worker is already gone
            conn.send(STOP)
        conn.close()
    # a worker stuck in a collective wakes up with an error once rank 0 leaves the group
    destroy_tensor_parallel()
    for proc in procs:
        proc.join(STOP_GRACE_SECONDS)
        if proc.is_alive():
            proc.terminate()
            proc.join(STOP_GRACE_SECONDS)
        if proc.is_alive():
            proc.kill()
            proc.join()
