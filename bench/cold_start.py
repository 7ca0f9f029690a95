"""Cold start of `pagoda serve` alone: `python -m bench.cold_start --runs 5`.

The measurement of bench.run's `cold-start` system (process start to the first 200 from /ready, and the
import / load / warm-up split the server logs), without the rest of the benchmark, plus the CPU seconds
the server had used by then (steadier than wall time on a shared machine). Prints each run and the
medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from bench.online import COLD_START_LINE
from bench.servers import ServerProcess, free_port, pagoda_serve_command

KEYS = ("process_to_ready_s", "cpu_s", "import_s", "load_s", "warmup_s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run() -> dict[str, float]:
    port = free_port()
    with ServerProcess("pagoda-cold-start", pagoda_serve_command(port, []), port, "/ready").start() as server:
        assert server.process is not None and server.ready_seconds is not None
        run = {"process_to_ready_s": server.ready_seconds, "cpu_s": cpu_seconds(server.process.pid)}
        match = COLD_START_LINE.search(server.log_path.read_text(errors="replace"))
        if match:
            run.update(zip(("import_s", "load_s", "warmup_s"), map(float, match.groups()[:3])))
        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(" ".join(f"{key:>18}" for key in KEYS))
    runs = []
    for _ in range(args.runs):
        runs.append(one_run())
        print(" ".join(f"{runs[-1].get(key, float('nan')):18.2f}" for key in KEYS), flush=True)
    medians = [statistics.median(r[key] for r in runs if key in r) for key in KEYS]
    print("median " + " ".join(f"{m:.2f}" for m in medians))


if __name__ == "__main__":
    main()
