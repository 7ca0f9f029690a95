"""AsyncLLM: the synchronous LLMEngine driven from one background thread, fed from asyncio.

The engine is not thread-safe, so exactly one thread (the engine loop) touches it: it loads the model,
warms it up, then repeats "take new requests and aborts, step, hand the outputs to the event loop".
Requests and aborts reach it through lists guarded by a condition variable, which the loop sleeps on
when it has nothing to do (no busy spin, the GIL is free). Outputs go back in one
`call_soon_threadsafe` per step to per-request asyncio queues.

With tensor parallelism the engine also needs its worker processes: the liveness check looks at them on
every call, and an idle loop wakes every `WORKER_WATCH_SECONDS` to fail the engine once one has died, so
that a death between requests is reported at once, not by the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.config import EngineConfig
from pagoda.engine.interface import EngineCore
from pagoda.engine.stats import EngineStats
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.distributed.workers import TensorParallelWorkers

logger = logging.getLogger(__name__)

WORKER_WATCH_SECONDS = 0.5  # how often an idle tensor-parallel engine checks that its workers still run


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served any more."""


class RequestAbortedError(RuntimeError):
    """The request was aborted (by the server draining, or by an explicit abort) before it finished."""


@dataclass
class StepReport:
    """What one pass of the engine loop did, for metrics."""

    outputs: list[RequestOutput]
    stats: EngineStats
    aborted: dict[str, float]  # request id -> arrival time (monotonic), of requests aborted this pass
    time: float  # time.monotonic() right after the step


@dataclass
class StartupTimes:
    load_s: float = 0.0
    warmup_s: float = 0.0


@dataclass
class _NewRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class _LoopPass:
    """Results of one engine-loop pass, shipped to the event loop in a single callback."""

    admitted: list[str] = field(default_factory=list)
    rejected: dict[str, BaseException] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)


_ABORTED = object()  # queued to a stream when its request is aborted


class RequestStream:
    """The outputs of one request, as an async iterator; ends after the finished output."""

    def __init__(self, request_id: str, arrival_time: float, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.arrival_time = arrival_time
        self.admitted: asyncio.Future[None] = loop.create_future()
        self.queue: asyncio.Queue[RequestOutput | BaseException | object] = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while True:
            item = await self.queue.get()
            if item is _ABORTED:
                raise RequestAbortedError(f"request {self.request_id} was aborted")
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, RequestOutput)
            yield item
            if item.finished:
                return


class AsyncLLM:
    """Owns the engine thread. Create and use it from within a running event loop."""

    def __init__(
        self,
        config: EngineConfig,
        engine_factory: Callable[[EngineConfig], EngineCore] | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._on_step = on_step
        self._on_fatal = on_fatal
        self.engine: EngineCore | None = None  # set by the engine thread once loaded; read-only elsewhere
        self._workers: TensorParallelWorkers | None = None  # likewise; None unless tensor-parallel
        self.startup_times = StartupTimes()
        self.ready = asyncio.Event()
        self.dead_error: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._streams: dict[str, RequestStream] = {}
        self._stats: EngineStats | None = None
        # shared with the engine thread, under _wakeup
        self._wakeup = threading.Condition()
        self._new: list[_NewRequest] = []
        self._aborts: list[str] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------

    def start(self) -> None:
        """Start loading the model in the engine thread; `ready` is set once it is warmed up."""
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """Liveness: the engine thread runs (or has yet to start) and so does every tensor-parallel worker.
        Cheap, and answers even while a step runs (or hangs in a collective with a dead worker)."""
        workers = self._workers
        return (
            self.dead_error is None
            and (self._thread.is_alive() or not self._thread.ident)
            and (workers is None or workers.all_alive)
        )

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    @property
    def num_waiting_requests(self) -> int:
        """Requests waiting for a batch slot: the engine's queue plus handed-in requests that will not fit."""
        with self._wakeup:
            pending = len(self._new)
        stats = self._stats
        if stats is None:
            return pending
        return stats.num_waiting + max(0, pending + stats.num_running - self.config.max_num_seqs)

    def get_stats(self) -> EngineStats | None:
        return self._stats

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> RequestStream:
        """Hand a request to the engine; returns once it is admitted (raises ValueError if it never fits)."""
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_error!r}")
        if not self.ready.is_set():
            raise EngineDeadError("the engine is not ready")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        stream = RequestStream(request_id, arrival_time, self._loop)
        self._streams[request_id] = stream
        with self._wakeup:
            self._new.append(_NewRequest(request_id, prompt, params, arrival_time))
            self._wakeup.notify()
        try:
            await stream.admitted
        except BaseException:
            # rejected, or the client went away while waiting: make sure the engine forgets it
            self.abort_nowait(request_id)
            raise
        return stream

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs. Closing the iterator early aborts the request."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        async for output in self.outputs(stream):
            yield output

    async def outputs(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """Iterate an admitted request's outputs; leaving early (cancelled, closed) aborts the request."""
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort_nowait(stream.request_id)

    def abort_nowait(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished). Its KV blocks free within one engine pass."""
        stream = self._streams.get(request_id)
        if stream is None or stream.finished:
            return
        with self._wakeup:
            self._aborts.append(request_id)
            self._wakeup.notify()

    def abort_all(self) -> None:
        for request_id in list(self._streams):
            self.abort_nowait(request_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine thread (after its current step). Unfinished requests end with EngineDeadError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.ident:
            self._thread.join(timeout)
        if self.engine is not None:
            self.engine.close()  # stops tensor-parallel workers now rather than at exit
        self._fail_all(EngineDeadError("the engine has shut down"))

    def _dispatch(self, result: _LoopPass) -> None:
        """Runs on the event loop: route one pass's results to the request streams."""
        for request_id in result.admitted:
            stream = self._streams.get(request_id)
            if stream is not None and not stream.admitted.done():
                stream.admitted.set_result(None)
        for request_id, error in result.rejected.items():
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.finished = True
                if not stream.admitted.done():
                    stream.admitted.set_exception(error)
        for output in result.outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.queue.put_nowait(output)
            if output.finished:
                stream.finished = True
                del self._streams[output.request_id]
        for request_id in result.aborted:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.finished = True
                stream.queue.put_nowait(_ABORTED)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.finished = True
            if not stream.admitted.done():
                stream.admitted.set_exception(error)
            stream.queue.put_nowait(error)
        self._streams.clear()

    def _on_engine_death(self, error: BaseException) -> None:
        self.dead_error = error
        self._fail_all(EngineDeadError(f"the engine failed: {error!r}"))
        if self._on_fatal is not None:
            self._on_fatal(error)

    def _call_in_loop(self, callback: Callable[..., None], *args: object) -> None:
        # a closed event loop means the server is gone: nobody is listening any more
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    # ---- engine-thread side ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._load()
            self._serve(engine)
        except BaseException as error:
            logger.exception("the engine loop failed")
            self._call_in_loop(self._on_engine_death, error)

    def _load(self) -> EngineCore:
        factory = self._engine_factory
        if factory is None:
            from pagoda.engine.llm_engine import LLMEngine

            factory = LLMEngine
        start = time.perf_counter()
        logger.info("loading model %s", self.config.model or "(embedded SmolLM2-135M-Instruct)")
        engine = factory(self.config)
        self._workers = engine.workers  # watched from here on, warm-up included
        self.startup_times.load_s = time.perf_counter() - start
        logger.info("model loaded in %.2f s; warming up", self.startup_times.load_s)
        start = time.perf_counter()
        engine.warmup()
        self.startup_times.warmup_s = time.perf_counter() - start
        logger.info("warm-up done in %.2f s", self.startup_times.warmup_s)
        self._stats = engine.get_stats()
        self.engine = engine
        self._call_in_loop(self.ready.set)
        return engine

    def _has_work(self, engine: EngineCore) -> bool:
        return bool(self._new or self._aborts or self._stopping or engine.has_unfinished_requests())

    def _serve(self, engine: EngineCore) -> None:
        arrivals: dict[str, float] = {}  # unfinished request id -> arrival time; engine-thread only
        workers = self._workers
        idle_wait = None if workers is None else WORKER_WATCH_SECONDS
        while True:
            if workers is not None:
                # outside the lock: failing stops the other workers, which takes a while
                workers.check_alive()
            with self._wakeup:
                if not self._has_work(engine):
                    self._wakeup.wait(idle_wait)
                if self._stopping:
                    return
                if not self._has_work(engine):
                    continue  # woke only to check the workers
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
            result = _LoopPass()
            for request in new:
                try:
                    engine.add_request(
                        request.request_id, request.prompt, request.params, request.arrival_time
                    )
                    result.admitted.append(request.request_id)
                    arrivals[request.request_id] = request.arrival_time
                except Exception as error:  # one bad request must not take the engine down
                    result.rejected[request.request_id] = error
            aborted: dict[str, float] = {}
            for request_id in aborts:
                if request_id in arrivals:  # else it already finished: nothing to abort
                    engine.abort_request(request_id)
                    aborted[request_id] = arrivals.pop(request_id)
            result.aborted = list(aborted)
            if engine.has_unfinished_requests():
                result.outputs = engine.step()
                for output in result.outputs:
                    if output.finished:
                        arrivals.pop(output.request_id, None)
            self._stats = engine.get_stats()
            self._call_in_loop(self._dispatch, result)
            if self._on_step is not None:
                self._call_in_loop(
                    self._on_step, StepReport(result.outputs, self._stats, aborted, time.monotonic())
                )

