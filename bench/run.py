"""Run the benchmark suite: `python -m bench.run [--quick] [--systems a,b,...]`.

Writes docs/bench-results.json, the PNG plots and the generated part of docs/benchmarks.md.
Every system runs in its own process (or server), one after another, on the same workloads.
The router's benchmark (replicas behind `pagoda router`, per policy) runs alone: `python -m bench.router`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import llamacpp, online, report
from bench.env import DOCS_DIR, REPO_ROOT, machine_info
from bench.worker import run_task
from bench.workloads import LengthSpec, Workload, shared_prefix_workload, sharegpt_workload, to_json

SYSTEMS = ["gemm", "pagoda-offline", "hf-static", "hf-single", "pagoda-serve", "llama.cpp",
           "shared-prefix", "poisson", "kv", "cold-start"]


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark mode."""

    name: str
    lengths: LengthSpec
    max_model_len: int  # >= max_prompt + max_output; also what max-length reservation reserves
    num_requests: int  # the ShareGPT-shaped pool; every case takes a prefix of it
    hf_static_requests: int
    hf_single_requests: int
    concurrencies: list[int]
    overhead_concurrencies: list[int]  # offline at the same concurrency as the server, same requests
    shared_prefix_requests: int
    shared_prefix_system_len: int
    shared_prefix_concurrency: int
    poisson_rate: float | None  # requests/s; None skips the Poisson run
    kv_budget_sequences: int  # the KV budget, in max-length sequences
    gemm_batches: list[int] = field(default_factory=lambda: [1, 64])
    gemm_seconds: float = 0.5
    cold_start_runs: int = 1

    def requests_at(self, concurrency: int) -> int:
        """Enough requests per point that the clients stay busy for a while."""
        return min(self.num_requests, max(2 * concurrency, 4 if self.name != "full" else 8))


PROFILES = {
    "smoke": Profile(
        "smoke", LengthSpec(scale=0.04, max_prompt=16, max_output=8), max_model_len=32, num_requests=4,
        hf_static_requests=4, hf_single_requests=1, concurrencies=[2], overhead_concurrencies=[],
        shared_prefix_requests=2, shared_prefix_system_len=16, shared_prefix_concurrency=2,
        poisson_rate=4.0, kv_budget_sequences=2,
    ),
    "quick": Profile(
        "quick", LengthSpec(scale=0.125, max_prompt=128, max_output=128), max_model_len=256,
        num_requests=32, hf_static_requests=8, hf_single_requests=2, concurrencies=[1, 8],
        overhead_concurrencies=[8], shared_prefix_requests=8, shared_prefix_system_len=128,
        shared_prefix_concurrency=4, poisson_rate=None, kv_budget_sequences=4,
    ),
    "full": Profile(
        "full", LengthSpec(scale=0.5, max_prompt=512, max_output=512), max_model_len=1024,
        num_requests=128, hf_static_requests=32, hf_single_requests=8, concurrencies=[1, 4, 16, 32, 64],
        overhead_concurrencies=[1, 8, 16, 32], shared_prefix_requests=64, shared_prefix_system_len=512,
        shared_prefix_concurrency=16, poisson_rate=1.0, kv_budget_sequences=4,
        gemm_batches=[1, 8, 32, 64, 128, 256], gemm_seconds=1.0, cold_start_runs=3,
    ),
}


class Bench:
    def __init__(self, profile: Profile, systems: list[str], build_llamacpp: bool) -> None:
        self.profile = profile
        self.systems = systems
        self.build_llamacpp = build_llamacpp
        self.pool = sharegpt_workload(profile.num_requests, profile.lengths)
        self.results: dict[str, Any] = {"offline": {}, "online": {}, "shared_prefix": {}, "skipped": {}}
        self.engine_options = {"max_model_len": profile.max_model_len}

    def _log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def run(self) -> dict[str, Any]:
        self.results["workloads"] = {"sharegpt": self.pool.summary()}
        steps = [
            ("gemm", self.gemm), ("pagoda-offline", self.pagoda_offline), ("hf-static", self.hf_static),
            ("hf-single", self.hf_single), ("pagoda-serve", self.pagoda_serve), ("llama.cpp", self.llamacpp),
            ("shared-prefix", self.shared_prefix), ("poisson", self.poisson), ("kv", self.kv),
            ("cold-start", self.cold_start),
        ]
        for name, step in steps:
            if name in self.systems:
                self._log(f"{name} ...")
                start = time.perf_counter()
                step()
                self._log(f"{name} done in {time.perf_counter() - start:.0f} s")
        return self.results

    def _offline(self, workload: Workload, **options: Any) -> dict[str, Any]:
        args = {"workload": to_json(workload), "engine_options": {**self.engine_options, **options}}
        return run_task("pagoda-offline", args)

    def gemm(self) -> None:
        self.results["gemm"] = run_task(
            "gemm", {"batch_sizes": self.profile.gemm_batches, "seconds": self.profile.gemm_seconds}
        )

    def pagoda_offline(self) -> None:
        offline = self.results["offline"]
        offline["pagoda"] = self._offline(self.pool)
        for c in self.profile.overhead_concurrencies:
            offline[f"pagoda@{c}"] = {
                "concurrency": c, **self._offline(self.pool.head(self.profile.requests_at(c)), max_num_seqs=c)
            }

    def hf_static(self) -> None:
        workload = self.pool.head(self.profile.hf_static_requests)
        args = {"workload": to_json(workload), "batch_size": 8}
        self.results["offline"]["hf-static-8"] = run_task("hf", args)

    def hf_single(self) -> None:
        workload = self.pool.head(self.profile.hf_single_requests)
        args = {"workload": to_json(workload), "batch_size": 1}
        self.results["offline"]["hf-single"] = run_task("hf", args)

    def _sweep(self, spec: online.ServerSpec) -> list[dict[str, Any]]:
        points = []
        for c in self.profile.concurrencies:
            self._log(f"  {spec.system} at concurrency {c}")
            points.append(online.concurrency_point(spec, self.pool.head(self.profile.requests_at(c)), c))
        return points

    def _llamacpp_ready(self) -> bool:
        if llamacpp.SERVER_BINARY.exists():
            return True
        if not self.build_llamacpp:
            self.results["skipped"]["llama.cpp"] = "not built: run `python -m bench.llamacpp` first"
            self._log("llama.cpp is not built; skipping it (python -m bench.llamacpp builds it)")
            return False
        llamacpp.build()
        return True

    def pagoda_serve(self) -> None:
        spec = online.ServerSpec("pagoda-serve", self.profile.max_model_len)
        self.results["online"]["pagoda-serve"] = self._sweep(spec)

    def llamacpp(self) -> None:
        if self._llamacpp_ready():
            spec = online.ServerSpec("llama.cpp", self.profile.max_model_len)
            self.results["online"]["llama.cpp"] = self._sweep(spec)

    def shared_prefix(self) -> None:
        p = self.profile
        workload = shared_prefix_workload(p.shared_prefix_requests, p.shared_prefix_system_len, p.lengths)
        self.results["workloads"]["shared-prefix"] = workload.summary()
        max_len = p.shared_prefix_system_len + p.max_model_len + 64  # the chat template's own tokens
        specs = {
            "pagoda-serve": online.ServerSpec("pagoda-serve", max_len),
            "pagoda-serve (no prefix caching)": online.ServerSpec(
                "pagoda-serve", max_len, ("--no-enable-prefix-caching",)
            ),
        }
        if self._llamacpp_ready():
            specs["llama.cpp"] = online.ServerSpec("llama.cpp", max_len)
        for name, spec in specs.items():
            self._log(f"  {name}")
            point = online.concurrency_point(spec, workload, p.shared_prefix_concurrency)
            self.results["shared_prefix"][name] = point

    def poisson(self) -> None:
        rate = self.profile.poisson_rate
        if rate is None:
            return
        workload = self.pool.head(min(64, self.profile.num_requests))
        points = {"rate": rate}
        specs = [online.ServerSpec("pagoda-serve", self.profile.max_model_len)]
        if self._llamacpp_ready():
            specs.append(online.ServerSpec("llama.cpp", self.profile.max_model_len))
        for spec in specs:
            self._log(f"  {spec.system} at {rate} requests/s")
            points[spec.system] = online.poisson_point(spec, workload, rate, max_parallel=32)
        self.results["poisson"] = points

    def kv(self) -> None:
        block_size = 16
        budget_tokens = self.profile.kv_budget_sequences * self.profile.max_model_len
        args = {
            "workload": to_json(self.pool),
            "engine_options": self.engine_options,
            "budget_blocks": budget_tokens // block_size,
        }
        self.results["kv"] = run_task("pagoda-kv", args)

    def cold_start(self) -> None:
        self.results["cold_start"] = online.cold_start(self.profile.cold_start_runs)


def _git_commit() -> str | None:
    command = ["git", "rev-parse", "--short", "HEAD"]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small workloads: a few minutes in all")
    parser.add_argument("--smoke", action="store_true", help="tiny workloads (the CI smoke test)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of: {', '.join(SYSTEMS)}")
    parser.add_argument("--no-build", action="store_true", help="skip llama.cpp unless already built")
    parser.add_argument("--results", type=Path, default=DOCS_DIR / "bench-results.json")
    parser.add_argument("--docs", type=Path, default=DOCS_DIR, help="where the plots and benchmarks.md go")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    # the quick mode must stay quick: it never starts a llama.cpp build of many minutes
    build = not args.no_build and profile.name == "full"
    started = time.time()
    results = Bench(profile, systems, build).run()
    results["meta"] = {
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "profile": asdict(profile),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": _git_commit(),
        "duration_s": time.time() - started,
    }
    results["ratios"] = report.ratios(results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1, default=str))
    report.write(results, args.docs)
    print(json.dumps(results["ratios"], indent=1))
    return results


if __name__ == "__main__":
    main()
