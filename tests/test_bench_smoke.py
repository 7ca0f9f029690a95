"""The benchmark harness end to end on its smallest case: Pagoda offline and its KV accounting.

No timing assertions: only that the harness runs, every request got exactly the tokens it asked
for (ignore_eos), and the results and report hang together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

# `bench` is a top-level folder of the repository, not an installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import run  # noqa: E402
from bench.metrics import percentile  # noqa: E402
from bench.workloads import LengthSpec, sharegpt_workload  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    run.main(["--smoke", "--systems", "pagoda-offline,kv", "--results", str(out / "results.json"),
              "--docs", str(out)])
    return json.loads((out / "results.json").read_text()), out


def test_offline_produces_exactly_the_requested_tokens(smoke: tuple[dict, Path]) -> None:
    results, _ = smoke
    pagoda = results["offline"]["pagoda"]
    workload = sharegpt_workload(run.PROFILES["smoke"].num_requests, run.PROFILES["smoke"].lengths)
    assert pagoda["num_requests"] == len(workload.requests)
    assert pagoda["output_tokens_match"] is True
    assert pagoda["output_tokens"] == pagoda["requested_output_tokens"] == workload.num_output_tokens
    assert pagoda["prompt_tokens"] == workload.num_prompt_tokens
    assert pagoda["wall_seconds"] > 0 and pagoda["output_tokens_per_s"] > 0
    assert pagoda["peak_rss_bytes"] > 50 * 2**20  # the model alone is bigger than that


def test_kv_accounting_is_consistent(smoke: tuple[dict, Path]) -> None:
    kv = smoke[0]["kv"]
    u = kv["utilization"]
    assert all(0 < value <= 1 for value in u.values())
    # a block table never holds more than max_model_len slots, so paging can only do better
    assert u["paged"] >= u["reserve_max_model_len"]
    seqs = kv["concurrent_sequences"]
    assert seqs["reserve_max_model_len"] == kv["budget_tokens"] // kv["max_model_len"]
    assert 1 <= seqs["paged_peak"] <= kv["num_requests"]


def test_report_is_written(smoke: tuple[dict, Path]) -> None:
    results, out = smoke
    assert results["meta"]["machine"]["cores"] >= 1
    assert results["meta"]["profile"]["name"] == "smoke"
    page = (out / "benchmarks.md").read_text()
    assert "### Offline throughput" in page and "### KV-cache memory efficiency" in page
    assert (out / "bench-throughput.png").stat().st_size > 1000


def test_percentiles_match_numpy() -> None:
    values = list(np.random.default_rng(0).exponential(size=101))
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_workload_lengths_follow_the_spec() -> None:
    spec = LengthSpec(scale=0.1, max_prompt=64, max_output=32)
    workload = sharegpt_workload(20, spec, seed=3)
    assert workload.requests == sharegpt_workload(20, spec, seed=3).requests  # fixed seed
    assert all(spec.min_len <= r.prompt_len <= 64 and spec.min_len <= r.output_len <= 32
               for r in workload.requests)
