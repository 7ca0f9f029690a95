"""Online serving measurements: a server per point, streaming clients against it, and cold start."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from bench import llamacpp
from bench.clients import run_concurrent, run_poisson
from bench.env import MODEL_NAME, embedded_gguf, num_cores
from bench.metrics import records_to_json
from bench.servers import ServerProcess, free_port, pagoda_serve_command
from bench.workloads import Workload

COLD_START_LINE = re.compile(
    r"cold start: import ([\d.]+) s, load ([\d.]+) s, warm-up ([\d.]+) s, total ([\d.]+) s"
)


@dataclass(frozen=True)
class ServerSpec:
    """How to start one system's server for a given concurrency."""

    system: str  # "pagoda-serve" | "llama.cpp"
    max_model_len: int
    extra_args: tuple[str, ...] = ()

    def server(self, concurrency: int) -> ServerProcess:
        port = free_port()
        if self.system == "pagoda-serve":
            args = ["--max-model-len", str(self.max_model_len), "--served-model-name", MODEL_NAME,
                    *self.extra_args]
            return ServerProcess(f"pagoda-c{concurrency}", pagoda_serve_command(port, args), port, "/ready")
        if self.system == "llama.cpp":
            command = llamacpp.server_command(
                llamacpp.SERVER_BINARY, embedded_gguf(), port, parallel=concurrency,
                threads=num_cores(), ctx_per_slot=self.max_model_len,
            )
            return ServerProcess(f"llamacpp-c{concurrency}", [*command, *self.extra_args], port, "/health")
        raise ValueError(f"unknown server system {self.system!r}")


def _finish(result: dict[str, Any], server: ServerProcess) -> dict[str, Any]:
    records = result.pop("records")
    result["records"] = records_to_json(records)
    result["peak_rss_bytes"] = server.peak_rss_bytes()
    result["ready_seconds"] = server.ready_seconds
    result["output_tokens_match"] = all(
        r.num_output_tokens == r.output_len for r in records if r.error is None
    ) and result["num_errors"] == 0
    return result


def concurrency_point(spec: ServerSpec, workload: Workload, concurrency: int) -> dict[str, Any]:
    """A fresh server, `concurrency` streaming clients until the workload is done, then its peak memory."""
    with spec.server(concurrency).start() as server:
        result = asyncio.run(run_concurrent(server.base_url, MODEL_NAME, workload, concurrency))
        return _finish(result, server)


def poisson_point(spec: ServerSpec, workload: Workload, rate: float, max_parallel: int) -> dict[str, Any]:
    with spec.server(max_parallel).start() as server:
        result = asyncio.run(run_poisson(server.base_url, MODEL_NAME, workload, rate))
        return _finish(result, server)


def cold_start(runs: int) -> dict[str, Any]:
    """`pagoda serve` with no model (the embedded one): process start to the first 200 from /ready.

    The import / load / warm-up split is the one the server logs on its way to ready.
    """
    samples = []
    for _ in range(runs):
        port = free_port()
        with ServerProcess("pagoda-cold-start", pagoda_serve_command(port, []), port, "/ready").start() as s:
            sample: dict[str, float | None] = {"process_to_ready_s": s.ready_seconds}
            match = COLD_START_LINE.search(s.log_path.read_text(errors="replace"))
            if match:
                sample.update(zip(("import_s", "load_s", "warmup_s", "logged_total_s"),
                                  map(float, match.groups())))
            samples.append(sample)
    best = min(samples, key=lambda x: x["process_to_ready_s"] or float("inf"))
    return {"runs": samples, "best": best}
