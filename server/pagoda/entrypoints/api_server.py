"""The OpenAI-compatible HTTP server: FastAPI routes, probes, metrics, auth, and the drain on SIGTERM.

Lifecycle: uvicorn listens at once (so the probes answer while the model loads); the engine thread
loads and warms up the model, then the server turns ready. The first SIGTERM/SIGINT turns /ready to
503 and refuses new work, lets in-flight requests finish for up to --shutdown-timeout seconds, aborts
the rest (streams end with an error chunk) and exits 0; a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import hmac
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

import pagoda
from pagoda.config import EngineConfig
from pagoda.engine.async_engine import AsyncLLM
from pagoda.entrypoints.constraints import ToolOptions
from pagoda.entrypoints.errors import OpenAIError, error_response, install_error_handlers
from pagoda.entrypoints.metrics import ServerMetrics
from pagoda.entrypoints.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagoda.entrypoints.serving_chat import ServingChat
from pagoda.entrypoints.serving_completion import ServingCompletion
from pagoda.entrypoints.serving_engine import Tokenizers

logger = logging.getLogger("pagoda.server")

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/version", "/openapi.json", "/docs", "/redoc"})
MAX_BODY_BYTES = 32 * 2**20
INLINE_BODY_BYTES = 64 * 2**10  # smaller bodies are validated on the event loop: a thread hop costs more
# what a body costs to parse and validate goes with its number of JSON values, which is at most its commas
# plus its nesting depth (bounded by the parser); 2M values take about 0.3 s, more than any context holds
MAX_BODY_COMMAS = 2**21
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)
}


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    DEAD = "dead"


@dataclass
class ServerSettings:
    """What the HTTP layer needs beyond the engine config (all from the CLI)."""

    served_model_names: list[str] | None = None
    api_key: str | None = None
    max_queue_len: int | None = None
    shutdown_timeout: float = 30.0
    http_read_timeout: float = 60.0  # for a request's headers, and then for its body
    trust_request_chat_template: bool = False
    tool_options: ToolOptions = field(default_factory=ToolOptions)  # tool calling and reasoning parsers
    import_seconds: float = 0.0  # measured by the CLI, reported in the cold-start line


@dataclass
class ServerState:
    """Everything the routes share; the serving objects exist once the engine is ready."""

    config: EngineConfig
    settings: ServerSettings
    phase: Phase = Phase.LOADING
    llm: AsyncLLM | None = None
    completion: ServingCompletion | None = None
    chat: ServingChat | None = None
    metrics: ServerMetrics | None = None
    model_root: str = ""
    exit_code: int = 0
    request_exit: Callable[[], None] = lambda: None  # set by the runner: tells uvicorn to stop
    background: set[asyncio.Task] = field(default_factory=set)

    def serving(self) -> tuple[ServingCompletion, ServingChat]:
        if self.completion is None or self.chat is None:
            raise OpenAIError(503, "the model is still loading", code="model_loading")
        return self.completion, self.chat


# ---- ASGI middleware: body size, readiness gate, API key ----------------------------------------------


class GateMiddleware:
    """Runs before routing: 413 for oversized bodies, 503 unless ready, 401 without the API key, and the
    body read in full (408 if it does not come within the read timeout, 413 as soon as it is too large,
    chunked or not) before the app sees the request."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.settings.api_key
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        rejection = self._reject(scope)
        body: Message = {"type": "http.request"}
        if rejection is None:
            body, rejection = await self._read_body(receive)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        if body["type"] != "http.request":
            return  # the client left before its body was in: nobody to answer
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> tuple[Message, Response | None]:
        chunks: list[bytes] = []
        size = 0
        timeout = self.state.settings.http_read_timeout
        try:
            async with asyncio.timeout(timeout or None):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return message, None  # the client left
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > MAX_BODY_BYTES:
                        return message, _too_large()
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            response = error_response(408, f"the request body did not arrive within {timeout:g} s")
            response.headers["Connection"] = "close"  # the rest of the body may still come: not read
            return {}, response
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}, None

    def _reject(self, scope: Scope) -> Response | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _too_large()
        if self._expected is not None and not hmac.compare_digest(
            headers.get(b"authorization", b""), self._expected
        ):
            return error_response(401, "invalid or missing API key", code="invalid_api_key")
        phase = self.state.phase
        if phase is Phase.LOADING:
            return error_response(503, "the model is still loading", code="model_loading")
        if phase is Phase.DRAINING:
            return error_response(503, "the server is shutting down", code="server_shutting_down")
        if phase is Phase.DEAD:
            return error_response(503, "the engine has failed", code="engine_dead")
        return None


def _too_large() -> Response:
    return error_response(413, f"request body larger than {MAX_BODY_BYTES} bytes")


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive() that gives the body read ahead, then the connection's own messages (a disconnect)."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline on each request's headers: a connection that opens (or
    starts a request) and does not finish its headers within `head_timeout` seconds is closed, instead of
    being held forever. Idle keep-alive connections keep uvicorn's own, shorter timeout."""

    head_timeout = 60.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._arm_head_timer()
        super().data_received(data)
        if not self._awaiting_head and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    @property
    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self.head_timeout > 0:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self.transport.is_closing():
            self.transport.close()


def _copy_tokenizers(engine: Any, done: concurrent.futures.Future[Tokenizers]) -> None:
    try:
        done.set_result(Tokenizers(engine.tokenizer))
    except BaseException as error:  # raised where the server turns ready, which then never happens
        done.set_exception(error)


class ClosingStreamingResponse(StreamingResponse):
    """Closes the body generator as soon as the response ends, so an early disconnect aborts at once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _cancel_on_disconnect(request: Request, handler: Any) -> Any:
    """Run a handler, cancelling it (which aborts its engine requests) if the client goes away."""
    work = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return work.result()


def _respond(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if hasattr(result, "__aiter__"):
        return ClosingStreamingResponse(
            result,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return JSONResponse(result.model_dump())


class OffLoopBodyRoute(APIRoute):
    """A route whose body is read as JSON whatever its content type (like the OpenAI API: `curl -d` sends a
    form type), parsed and validated by pydantic on a worker thread rather than by FastAPI on the event loop
    (`json.loads`, then pydantic). pydantic holds the GIL only in stretches, and the bound on a body's JSON
    values keeps those short: a 30 MB body of token ids held the probes for 13 s on the loop. The endpoint
    gets the model and the raw request, as FastAPI would pass them (the signature still gives the OpenAPI
    document its request schema)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        if self.body_field is None:
            return super().get_route_handler()
        model: type[BaseModel] = self.body_field.field_info.annotation  # type: ignore[assignment]
        body_name, request_name = self.body_field.name, self.dependant.request_param_name
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            raw = await request.body()
            if raw.count(b",") > MAX_BODY_COMMAS:
                raise OpenAIError(413, f"the request body holds more than {MAX_BODY_COMMAS} JSON values")
            parse = functools.partial(_validate_json, model, raw)
            body = parse() if len(raw) <= INLINE_BODY_BYTES else await asyncio.to_thread(parse)
            if not isinstance(body, BaseModel):
                raise RequestValidationError(body)
            arguments: dict[str, Any] = {body_name: body}
            if request_name is not None:
                arguments[request_name] = request
            result = await endpoint(**arguments)
            return result if isinstance(result, Response) else JSONResponse(result.model_dump())

        return handler


def _validate_json(model: type[BaseModel], raw: bytes) -> BaseModel | list[Any]:
    """The body as `model`, or its validation errors, without their inputs: making a Python object of the
    input that failed (a list of 15M token ids) would take seconds."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        return list(error.errors(include_url=False, include_input=False))


# ---- the app -------------------------------------------------------------------------------------------


def build_app(config: EngineConfig, settings: ServerSettings, engine_factory: Any = None) -> FastAPI:
    state = ServerState(config=config, settings=settings)
    state.model_root = config.model or "builtin://smollm2-135m-instruct"

    tokenizers: concurrent.futures.Future[Tokenizers] = concurrent.futures.Future()

    def load_engine(engine_config: EngineConfig) -> Any:
        """The engine, and (on a thread of their own, while the engine thread warms it up) the HTTP side's
        copies of its tokenizer: deep copies of a large vocabulary take most of a second."""
        if engine_factory is None:
            from pagoda.engine.llm_engine import LLMEngine

            engine = LLMEngine(engine_config)
        else:
            engine = engine_factory(engine_config)
        threading.Thread(target=_copy_tokenizers, args=(engine, tokenizers), daemon=True).start()
        return engine

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.llm = AsyncLLM(config, load_engine, on_step=_observe_step, on_fatal=_on_fatal)
        state.llm.start()
        task = asyncio.create_task(_become_ready())
        state.background.add(task)
        yield
        task.cancel()
        state.llm.shutdown()

    async def _become_ready() -> None:
        assert state.llm is not None
        await state.llm.ready.wait()
        engine = state.llm.engine
        names = settings.served_model_names or [engine.model_name]
        state.metrics = ServerMetrics(names[0], state.llm.get_stats)
        trust = settings.trust_request_chat_template
        copies = await asyncio.wrap_future(tokenizers)
        state.completion = ServingCompletion(state.llm, names, settings.max_queue_len, trust, copies)
        state.chat = ServingChat(
            state.llm, names, settings.max_queue_len, trust, copies, tool_options=settings.tool_options
        )
        times = state.llm.startup_times
        total = settings.import_seconds + times.load_s + times.warmup_s
        logger.info(
            "cold start: import %.2f s, load %.2f s, warm-up %.2f s, total %.2f s",
            settings.import_seconds,
            times.load_s,
            times.warmup_s,
            total,
        )
        if state.phase is Phase.LOADING:
            state.phase = Phase.READY
            logger.info("ready: serving %s (max_model_len %d)", ", ".join(names), engine.max_model_len)

    def _observe_step(report: Any) -> None:
        if state.metrics is not None:
            state.metrics.observe_step(report)

    def _on_fatal(error: BaseException) -> None:
        if state.phase is Phase.LOADING:
            logger.error("the model failed to load: %r; exiting", error)
            state.exit_code = 1
            state.request_exit()
        state.phase = Phase.DEAD

    app = FastAPI(
        title="Pagoda",
        version=pagoda.__version__,
        lifespan=lifespan,
        description="OpenAI-compatible LLM serving (paged KV cache, continuous batching).",
    )
    app.router.route_class = OffLoopBodyRoute
    app.state.pagoda = state
    install_error_handlers(app)
    app.add_middleware(GateMiddleware, state=state)

    @app.get("/health", summary="Liveness: the process, the engine loop and its workers are alive")
    async def health() -> Response:
        llm = state.llm
        if llm is None or not llm.is_alive:
            why = f": {llm.dead_error}" if llm is not None and llm.dead_error is not None else ""
            return error_response(503, f"the engine is not running{why}", code="engine_dead")
        return Response(status_code=200)

    @app.get("/ready", summary="Readiness: the model is loaded and warmed up, and the server is not draining")
    async def ready() -> Response:
        if state.phase is Phase.READY:
            return JSONResponse({"status": "ready"})
        return error_response(503, f"not ready: {state.phase.value}", code=state.phase.value)

    @app.get("/metrics", summary="Prometheus metrics (vLLM names)")
    async def metrics() -> Response:
        body = state.metrics.render() if state.metrics is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagoda.__version__}

    @app.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
    async def models() -> ModelList:
        completion, _ = state.serving()
        return ModelList(
            data=[
                ModelCard(id=name, root=state.model_root, max_model_len=completion.max_model_len)
                for name in completion.served_model_names
            ]
        )

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **_ERROR_RESPONSES})
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        completion, _ = state.serving()
        return _respond(await _cancel_on_disconnect(raw, completion.create(body)))

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}, **_ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        _, chat = state.serving()
        return _respond(await _cancel_on_disconnect(raw, chat.create(body)))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        completion, _ = state.serving()
        completion.check_model(body.model)
        if body.messages is not None:
            tokens = await completion.chat_prompt_ids(body.messages, body.add_generation_prompt, None)
        else:
            tokens = await completion.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=completion.max_model_len, tokens=tokens)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        completion, _ = state.serving()
        completion.check_model(body.model)
        return DetokenizeResponse(prompt=await completion.detokenize(body.tokens))

    return app


# ---- running it: uvicorn with our own signal handling ----------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains instead of stopping, and a second exits."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal after shutting down, which would make the exit code -15, not 0
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._signalled:
            logger.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(1)
        self._signalled = True
        logger.info("%s received: draining", signal.Signals(sig).name)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        task = asyncio.ensure_future(drain(self.state))
        self.state.background.add(task)


async def drain(state: ServerState) -> None:
    """Stop taking work, let in-flight requests finish within the timeout, abort the rest, then exit."""
    if state.phase is not Phase.DEAD:
        state.phase = Phase.DRAINING
    llm = state.llm
    deadline = time.monotonic() + state.settings.shutdown_timeout
    while llm is not None and llm.num_unfinished_requests and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if llm is not None and llm.num_unfinished_requests:
        logger.warning("shutdown timeout: aborting %d unfinished requests", llm.num_unfinished_requests)
        llm.abort_all()
        # give the aborted streams a moment to write their final error chunk
        flush_deadline = time.monotonic() + 2.0
        while llm.num_unfinished_requests and time.monotonic() < flush_deadline:
            await asyncio.sleep(0.05)
    logger.info("drained; shutting down")
    state.request_exit()


def run_server(
    config: EngineConfig,
    settings: ServerSettings,
    host: str,
    port: int,
    log_level: str = "info",
    engine_factory: Any = None,
) -> int:
    """Serve until a signal drains the server; returns the process exit code. `engine_factory`: what the
    engine thread calls for its engine (default: it builds an LLMEngine)."""
    app = build_app(config, settings, engine_factory)
    state: ServerState = app.state.pagoda
    protocol = type("TimedH11Protocol", (TimedH11Protocol,), {"head_timeout": settings.http_read_timeout})
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        lifespan="on",
        http=protocol,
    )
    server = _Server(uv_config, state)

    def request_exit() -> None:
        server.should_exit = True

    state.request_exit = request_exit
    server.run()
    if not server.started and state.exit_code == 0:
        return 1  # e.g. the port was taken
    return state.exit_code
