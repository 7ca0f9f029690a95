"""`pagoda router`: flags and the process around the proxy (imports aiohttp only when it runs)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal

from pagoda.cli import non_negative_float
from pagoda.router.policies import POLICIES, PrefixAffinity

ARGUMENTS_HELP = "Route OpenAI API requests across engine replicas (prefix- and load-aware)."


def finite_non_negative(text: str) -> float:
    """Seconds, factors and thresholds: NaN or infinity would reach the request path (a NaN hold never
    times out, an infinite one overflows Retry-After), so the flags refuse them."""
    value = non_negative_float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return value


def interval(text: str) -> float:
    value = finite_non_negative(text)
    if value == 0:  # the poll loop would never sleep
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    backends = parser.add_argument_group("backends")
    backends.add_argument(
        "--backend", action="extend", nargs="+", default=[], metavar="URL",
        help="An engine replica, e.g. http://10.0.0.5:8000 (repeatable).",
    )
    backends.add_argument(
        "--discovery-service", default=None, metavar="NAME",
        help="Discover replicas from the EndpointSlices of this (headless) Service; ready endpoints only.",
    )
    backends.add_argument(
        "--discovery-namespace", default=None,
        help="The Service's namespace. Default: the router's own (from its service account).",
    )
    backends.add_argument(
        "--discovery-port-name", default=None,
        help="Which EndpointSlice port to use. Default: the first one.",
    )
    backends.add_argument(
        "--kube-api-server", default=None, metavar="URL",
        help="Kubernetes API server URL. Default: the in-cluster one.",
    )
    backends.add_argument(
        "--health-interval", type=interval, default=1.0,
        help="Seconds between /ready polls of each replica. Default: %(default)s.",
    )
    backends.add_argument(
        "--scrape-interval", type=finite_non_negative, default=5.0,
        help="Seconds between /metrics scrapes (queue length, KV-cache usage) of each replica. "
        "Default: %(default)s.",
    )
    routing = parser.add_argument_group("routing")
    routing.add_argument(
        "--policy", choices=list(POLICIES), default="prefix",
        help="prefix: the replica likely to hold the prompt's prefix in KV cache, loads bounded; "
        "least-load: fewest open + waiting requests; round-robin: what a Service does. Default: %(default)s.",
    )
    routing.add_argument(
        "--load-factor", type=finite_non_negative, default=1.25,
        help="prefix: no replica takes more than this times the average load. Default: %(default)s.",
    )
    routing.add_argument(
        "--kv-cache-threshold", type=finite_non_negative, default=0.9,
        help="prefix: a replica whose scraped vllm:kv_cache_usage_perc is at least this is passed over "
        "while another has room; above 1: never. Default: %(default)s.",
    )
    routing.add_argument(
        "--hold-timeout", type=finite_non_negative, default=30.0,
        help="Seconds a request waits for a ready replica (scale from zero) before a 503; 0: no waiting. "
        "Default: %(default)s.",
    )
    routing.add_argument(
        "--max-pending", type=count, default=1000,
        help="Most requests waiting for a ready replica; more get a 503 at once. Default: %(default)s.",
    )
    routing.add_argument(
        "--max-retries", type=count, default=2,
        help="Other replicas tried after a refused connection or a 503 before the first byte. "
        "Default: %(default)s.",
    )
    server = parser.add_argument_group("HTTP server")
    server.add_argument("--host", default="0.0.0.0", help="Address to listen on. Default: %(default)s.")
    server.add_argument("--port", type=int, default=8000, help="Port to listen on. Default: %(default)s.")
    server.add_argument(
        "--ext-proc-port", type=int, default=None,
        help="Also serve Envoy's external-processing gRPC protocol on this port as the endpoint picker of a "
        "Gateway API InferencePool (needs pagoda[gateway]). Default: off.",
    )
    server.add_argument(
        "--shutdown-timeout", type=finite_non_negative, default=30.0,
        help="Seconds open requests get to finish after SIGTERM. Default: %(default)s.",
    )
    server.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="Log level. Default: %(default)s.",
    )


def run(args: argparse.Namespace) -> int:
    if not args.backend and not args.discovery_service:
        print("pagoda router: error: give --backend URL or --discovery-service NAME", flush=True)
        return 2
    if args.load_factor < 1:
        print("pagoda router: error: --load-factor must be >= 1", flush=True)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(args))
    except ValueError as error:
        print(f"pagoda router: error: {error}", flush=True)
        return 2
    return 0


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from pagoda.router.backends import BackendPool
    from pagoda.router.discovery import EndpointSliceWatcher, KubeAPI
    from pagoda.router.metrics import RouterMetrics
    from pagoda.router.proxy import Router, RouterSettings, build_app, upstream_session

    log = logging.getLogger("pagoda.router")
    metrics = RouterMetrics()
    policy = PrefixAffinity(args.load_factor) if args.policy == "prefix" else POLICIES[args.policy]()
    settings = RouterSettings(args.hold_timeout, args.max_pending, args.max_retries, args.kv_cache_threshold)
    async with upstream_session() as session:
        pool = BackendPool(session, metrics, args.health_interval, args.scrape_interval)
        tasks: list[asyncio.Task[None]] = []
        if args.discovery_service:
            api = KubeAPI.from_environment(args.kube_api_server, args.discovery_namespace)
            watcher = EndpointSliceWatcher(
                api, args.discovery_service, pool.set_members, args.discovery_port_name
            )
            tasks.append(asyncio.create_task(watcher.run(session), name="discovery"))
        else:
            pool.set_members(args.backend)
        router = Router(pool, policy, settings, metrics)
        runner = web.AppRunner(
            build_app(router, holding=args.hold_timeout > 0),
            handler_cancellation=True,  # a client disconnect cancels the handler and the upstream request
            auto_decompress=False,  # bodies go upstream as sent: a Content-Encoding is the engine's to judge
            access_log=None,
            shutdown_timeout=args.shutdown_timeout,
        )
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=1024, shutdown_timeout=args.shutdown_timeout)
        await site.start()
        log.info("router on http://%s:%d, policy %s", args.host, args.port, args.policy)
        picker = None
        if args.ext_proc_port is not None:
            from pagoda.router.extproc import start_ext_proc

            picker = await start_ext_proc(router, args.host, args.ext_proc_port)
            log.info("endpoint picker (Envoy ext-proc) on %s:%d", args.host, args.ext_proc_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: open requests get %.0f s", args.shutdown_timeout)
        if picker is not None:
            await picker.stop(args.shutdown_timeout)
        await runner.cleanup()  # stops accepting, waits for open requests up to the shutdown timeout
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
