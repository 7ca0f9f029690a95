"""The replica set: who may get new requests, and how loaded each one is.

A backend gets new requests only while its last /ready answered 200 and no connection to it has failed
since. Leaving the set, turning unready or being ejected only stops new requests: streams already open
run to their end. Load = this router's open requests on it + the engine's waiting queue; the engine's
KV-cache usage says whether it is nearly full. Both are scraped from /metrics at a low, fixed rate, on
the /ready poll that falls due (see docs/benchmarks.md "Router (issue 12)" for what a scrape costs the
engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp

from pagoda.router.metrics import RouterMetrics

log = logging.getLogger("pagoda.router")


def _gauge(name: bytes) -> re.Pattern[bytes]:
    return re.compile(rb"^" + re.escape(name) + rb"(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.MULTILINE)


_WAITING = _gauge(b"vllm:num_requests_waiting")
_KV_USAGE = _gauge(b"vllm:kv_cache_usage_perc")


def gauge_values(pattern: re.Pattern[bytes], text: bytes) -> list[float]:
    """The gauge's samples that make sense as a count or a fraction: a value that is no number, NaN, +Inf or
    negative (a broken or foreign exporter) counts as absent instead of killing the poll or the policy."""
    values = []
    for raw in pattern.findall(text):
        with contextlib.suppress(ValueError):
            value = float(raw)
            if 0 <= value < math.inf:
                values.append(value)
    return values


@dataclass
class Backend:
    url: str
    ready: bool = False  # last /ready answer (or a 503 seen while proxying)
    ejected: bool = False  # a connection failed; cleared by the next successful /ready
    in_flight: int = 0
    waiting: float = 0.0  # scraped vllm:num_requests_waiting
    kv_usage: float = 0.0  # scraped vllm:kv_cache_usage_perc, 0..1 (the highest, if several engines)
    last_scrape: float = -math.inf  # scrape at the first ready poll, however large the interval

    @property
    def eligible(self) -> bool:
        return self.ready and not self.ejected

    @property
    def load(self) -> float:
        return self.in_flight + self.waiting


class BackendPool:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: RouterMetrics,
        health_interval: float = 1.0,
        scrape_interval: float = 5.0,
    ) -> None:
        self.session = session
        self.metrics = metrics
        self.health_interval = health_interval
        self.scrape_interval = scrape_interval
        self.backends: dict[str, Backend] = {}  # members of the set
        self._changed = asyncio.Event()
        self._pollers: dict[str, asyncio.Task[None]] = {}

    # -- membership ------------------------------------------------------------------------------------
    def set_members(self, urls: Iterable[str]) -> None:
        """Replace the set (static flags or a discovery update); kept members keep their state."""
        wanted = {url.rstrip("/") for url in urls}
        for url in list(self.backends):
            if url not in wanted:
                log.info("backend %s left the set", url)
                del self.backends[url]
                self._pollers.pop(url).cancel()
                self.metrics.backend_ready.remove(url)
                with contextlib.suppress(KeyError):  # never scraped
                    self.metrics.backend_kv_usage.remove(url)
        for url in wanted - self.backends.keys():
            log.info("backend %s joined the set", url)
            self.backends[url] = Backend(url)
            self.metrics.backend_ready.labels(url).set(0)
            self._pollers[url] = asyncio.create_task(self._poll(url), name=f"poll {url}")
        self._notify()

    def eligible(self) -> dict[str, Backend]:
        return {url: b for url, b in self.backends.items() if b.eligible}

    async def wait_for_change(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_state(self, backend: Backend, ready: bool, ejected: bool) -> None:
        before = backend.eligible
        backend.ready, backend.ejected = ready, ejected
        if backend.eligible != before and backend.url in self.backends:
            self.metrics.backend_ready.labels(backend.url).set(int(backend.eligible))
            log.info("backend %s is %s", backend.url, "in" if backend.eligible else "out")
            self._notify()

    # -- what the proxy reports ------------------------------------------------------------------------
    def eject(self, backend: Backend) -> None:
        """Out after a refused connection (seen by the proxy or by a poll) until /ready answers 200."""
        if not backend.ejected:
            self.metrics.ejections.labels(backend.url).inc()
            log.warning("backend %s ejected (connection failed); rechecking", backend.url)
        self._set_state(backend, backend.ready, True)

    def mark_unready(self, backend: Backend) -> None:
        self._set_state(backend, False, backend.ejected)

    # -- polling ---------------------------------------------------------------------------------------
    async def close(self) -> None:
        for task in self._pollers.values():
            task.cancel()
        await asyncio.gather(*self._pollers.values(), return_exceptions=True)

    async def _poll(self, url: str) -> None:
        while True:
            backend = self.backends.get(url)
            if backend is None:
                return
            await self._check(backend)
            await asyncio.sleep(self.health_interval)

    async def _check(self, backend: Backend) -> None:
        timeout = aiohttp.ClientTimeout(total=max(self.health_interval, 2.0))
        try:
            async with self.session.get(f"{backend.url}/ready", timeout=timeout) as response:
                ready = response.status == 200
            if ready and time.monotonic() - backend.last_scrape >= self.scrape_interval:
                await self._scrape(backend, timeout)
            self._set_state(backend, ready, False)
        except aiohttp.ClientConnectorError:  # refused: a backend that was serving died
            if backend.eligible:
                self.eject(backend)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            self._set_state(backend, False, backend.ejected)

    async def _scrape(self, backend: Backend, timeout: aiohttp.ClientTimeout) -> None:
        backend.last_scrape = time.monotonic()
        async with self.session.get(f"{backend.url}/metrics", timeout=timeout) as response:
            if response.status != 200:
                return
            text = await response.read()
        backend.waiting = sum(gauge_values(_WAITING, text))
        backend.kv_usage = max(gauge_values(_KV_USAGE, text), default=0.0)
        if backend.url in self.backends:
            self.metrics.backend_kv_usage.labels(backend.url).set(backend.kv_usage)
