"""The router's HTTP server: /v1/* passed through to a chosen backend, plus /health, /ready, /metrics.

Bodies go upstream byte for byte and come back chunk by chunk as they arrive (SSE included), with the
engine's status code. A client that goes away cancels its handler (aiohttp's handler_cancellation), which
closes the upstream connection, which makes the engine abort the request and free its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import posixpath
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pagoda.router.backends import Backend, BackendPool
from pagoda.router.metrics import RouterMetrics
from pagoda.router.policies import Policy

log = logging.getLogger("pagoda.router")
# hop-by-hop headers (RFC 9110 7.6.1) and the ones aiohttp recomputes for the new connection
_DROP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)


@dataclass
class RouterSettings:
    hold_timeout: float = 30.0
    max_pending: int = 1000
    max_retries: int = 2
    kv_cache_threshold: float = 0.9  # scraped KV-cache usage at or above which a backend counts as full


class NoBackend(Exception):
    """No backend became ready in time (or the waiting room is full)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def error_body(status: int, message: str) -> dict[str, object]:
    kind = {404: "not_found_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
    if status >= 500 and status != 503:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_response(status: int, message: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return web.json_response(error_body(status, message), status=status, headers=headers)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The router's own refusals (a body over client_max_size, a path it does not serve) in the OpenAI
    error body, as the engine answers them."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, error.text or error.reason)


def _forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROP}


class Router:
    def __init__(
        self, pool: BackendPool, policy: Policy, settings: RouterSettings, metrics: RouterMetrics
    ) -> None:
        self.pool, self.policy, self.settings, self.metrics = pool, policy, settings, metrics
        self._waiting_since: dict[int, float] = {}  # id(request) -> arrival, for the queue-age gauge

    # -- choosing a backend ----------------------------------------------------------------------------
    async def choose(
        self, body: Mapping[str, object] | None, exclude: set[str], allowed: set[str] | None = None
    ) -> tuple[Backend, str, float]:
        """A backend for this request (among `allowed`, if given, and not in `exclude`), and the seconds
        it was held while none was ready (scale from zero)."""
        eligible = {u: b for u, b in self.eligible(allowed).items() if u not in exclude}
        held = 0.0
        if not eligible:
            start = time.perf_counter()
            eligible = await self._hold(allowed)
            held = time.perf_counter() - start
        full = {u for u, b in eligible.items() if b.kv_usage >= self.settings.kv_cache_threshold}
        decision = self.policy.choose(body, {u: b.load for u, b in eligible.items()}, full)
        return eligible[decision.backend], decision.reason, held

    def eligible(self, allowed: set[str] | None) -> dict[str, Backend]:
        eligible = self.pool.eligible()
        return eligible if allowed is None else {u: b for u, b in eligible.items() if u in allowed}

    async def _hold(self, allowed: set[str] | None) -> dict[str, Backend]:
        if self.eligible(allowed):  # ready ones exist, all already tried: a retry budget matter, not a hold
            raise NoBackend("every ready backend failed")
        if len(self._waiting_since) >= self.settings.max_pending:
            self.metrics.rejected.labels("queue-full").inc()
            raise NoBackend("too many requests are waiting for a ready backend")
        start = time.monotonic()
        token = object()
        self._waiting_since[id(token)] = start
        self.metrics.pending.inc()
        try:
            deadline = start + self.settings.hold_timeout
            while not self.eligible(allowed):
                self._export_oldest()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.metrics.rejected.labels("hold-timeout").inc()
                    raise NoBackend(f"no ready backend within {self.settings.hold_timeout:g} s")
                await self.pool.wait_for_change(min(remaining, 1.0))
            # after a wait, a backend that failed earlier may be back: try it again
            return self.eligible(allowed)
        finally:
            del self._waiting_since[id(token)]
            self.metrics.pending.dec()
            self.metrics.queue_time.observe(time.monotonic() - start)
            self._export_oldest()

    def _export_oldest(self) -> None:
        oldest = min(self._waiting_since.values(), default=None)
        self.metrics.oldest_pending.set(0.0 if oldest is None else time.monotonic() - oldest)

    # -- proxying --------------------------------------------------------------------------------------
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        arrival = time.perf_counter()
        # the upstream URL resolves dot segments: /v1/../metrics would reach the engine's /metrics
        if not (posixpath.normpath(request.rel_url.path) + "/").startswith("/v1/"):
            return error_response(404, "Not Found")
        payload = await request.read()
        body = parse_body(payload) if request.method == "POST" else None
        headers = _forward_headers(request.headers)
        tried: set[str] = set()
        for attempt in range(self.settings.max_retries + 1):
            try:
                backend, reason, held = await self.choose(body, tried)
            except NoBackend as error:
                return error_response(503, error.reason, retry_after=self.settings.hold_timeout or 1)
            tried.add(backend.url)
            self.metrics.requests.labels(backend.url, reason).inc()
            url = f"{backend.url}{request.rel_url}"
            backend.in_flight += 1
            self.metrics.in_flight.labels(backend.url).inc()
            try:
                if attempt == 0:
                    self.metrics.overhead.observe(time.perf_counter() - arrival - held)
                upstream = await self._send(backend, request.method, url, headers, payload)
                if upstream is None:  # failed before the first byte: try another backend
                    continue
                return await self._relay(request, backend, upstream)
            finally:
                backend.in_flight -= 1
                self.metrics.in_flight.labels(backend.url).dec()
        self.metrics.rejected.labels("retries-exhausted").inc()
        return error_response(503, "every backend tried failed before answering", retry_after=1)

    async def _send(
        self, backend: Backend, method: str, url: str, headers: dict[str, str], payload: bytes
    ) -> aiohttp.ClientResponse | None:
        """The upstream response once its headers arrived, or None after a retryable failure."""
        try:
            upstream = await self.pool.session.request(
                method, url, data=payload or None, headers=headers, allow_redirects=False
            )
        except aiohttp.ClientConnectorError as error:  # refused or unreachable: out until /ready answers
            log.warning("backend %s refused the connection: %r", backend.url, error)
            self.pool.eject(backend)
            self.metrics.retries.labels("connection").inc()
            return None
        except aiohttp.ClientResponseError as error:  # an answer that is not HTTP (a wrong port, say)
            log.warning("backend %s answered garbage: %r", backend.url, error)
            self.pool.eject(backend)
            self.metrics.retries.labels("bad-response").inc()
            return None
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as error:
            # reset before any byte of the answer (killed, or a keep-alive closed under us): nothing
            # reached the client yet; the /ready poll decides whether the backend stays in
            log.warning("backend %s failed before answering: %r", backend.url, error)
            self.metrics.retries.labels("disconnect").inc()
            return None
        if upstream.status == 503:  # loading or draining: out until its /ready says otherwise
            upstream.release()
            self.pool.mark_unready(backend)
            self.metrics.retries.labels("unavailable").inc()
            return None
        return upstream

    async def _relay(
        self, request: web.Request, backend: Backend, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(_forward_headers(upstream.headers))
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            while chunk := await self._read(backend, upstream):
                await response.write(chunk)
        except EngineWentAway as error:
            if upstream.content_type != "text/event-stream":
                raise  # a body cut short can only be told by closing the connection
            # a stream ends the way the engine ends one that fails: an error event, then [DONE]
            event = json.dumps(error_body(502, str(error)))
            await response.write(f"data: {event}\n\ndata: [DONE]\n\n".encode())
        except BaseException:
            upstream.close()  # drop the connection: the engine sees the disconnect and aborts
            raise
        finally:
            upstream.release()
        await response.write_eof()
        return response

    async def _read(self, backend: Backend, upstream: aiohttp.ClientResponse) -> bytes:
        """The next chunk of the answer (b"" at its end); a backend that breaks off its answer is out
        until its /ready answers again (killed pods refuse it, so they stay out)."""
        try:
            return await upstream.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
            log.warning("backend %s broke off its answer: %r", backend.url, error)
            self.pool.eject(backend)
            raise EngineWentAway(f"the engine at {backend.url} broke off its answer") from error


class EngineWentAway(Exception):
    """The connection to the engine broke after the first byte of its answer reached the client."""


def parse_body(payload: bytes) -> Mapping[str, object] | None:
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        return None  # not ours to judge: the engine answers it with its own 400
    return body if isinstance(body, dict) else None


def build_app(router: Router, holding: bool) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20, middlewares=[openai_errors])

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(_: web.Request) -> web.Response:
        count = len(router.pool.eligible())
        ok = count > 0 or holding
        return web.json_response({"ready": ok, "backends_ready": count}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        router._export_oldest()
        return web.Response(
            body=generate_latest(router.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/v1/{tail:.*}", router.proxy)
    return app


@contextlib.asynccontextmanager
async def upstream_session() -> AsyncIterator[aiohttp.ClientSession]:
    # idle connections close before uvicorn's 5 s keep-alive does, so a reused one is rarely dead
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
    ) as session:
        yield session
