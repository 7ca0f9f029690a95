"""One measurement in a fresh process: `python -m bench.worker TASK IN.json OUT.json`.

Each system gets its own process, so its peak memory is its own and no system inherits another's
threads, caches or allocator state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.env import REPO_ROOT
from bench.workloads import from_json


def _pagoda_offline(args: dict[str, Any]) -> dict[str, Any]:
    from bench import pagoda_offline

    return pagoda_offline.throughput(from_json(args["workload"]), args["engine_options"])


def _pagoda_kv(args: dict[str, Any]) -> dict[str, Any]:
    from bench import pagoda_offline

    return pagoda_offline.kv_accounting(
        from_json(args["workload"]), args["engine_options"], args["budget_blocks"]
    )


def _hf(args: dict[str, Any]) -> dict[str, Any]:
    from bench import hf_baseline

    return hf_baseline.run(from_json(args["workload"]), args["batch_size"])


def _gemm(args: dict[str, Any]) -> dict[str, Any]:
    from bench import gemm
    from bench.env import embedded_gguf

    return gemm.run(embedded_gguf(), args["batch_sizes"], args["seconds"])


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pagoda-offline": _pagoda_offline,
    "pagoda-kv": _pagoda_kv,
    "hf": _hf,
    "gemm": _gemm,
}


def run_task(task: str, args: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run one task in a child process and return its result (raises with the child's stderr on failure)."""
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-") as tmp:
        arg_path, out_path = Path(tmp) / "in.json", Path(tmp) / "out.json"
        arg_path.write_text(json.dumps(args))
        proc = subprocess.run(
            [sys.executable, "-m", "bench.worker", task, str(arg_path), str(out_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"bench task {task} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out_path.read_text())


def main() -> None:
    task, arg_path, out_path = sys.argv[1:4]
    result = TASKS[task](json.loads(Path(arg_path).read_text()))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
