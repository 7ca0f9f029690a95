"""bench/host_overhead on a tiny model: every phase it wraps around the engine's methods fires.

No timing assertions: a renamed engine method would fail to wrap or leave its phase at zero.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# `bench` is a top-level folder of the repository, not an installed package; tiny_models lies in tests/engine
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "engine"))

from tiny_models import make_tiny_model  # noqa: E402

from bench import host_overhead  # noqa: E402
from pagoda import LLM  # noqa: E402


def test_every_phase_of_a_decode_step_is_timed(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path / "llama")
    llm = LLM(model=str(path), device="cpu", max_num_seqs=4, max_model_len=256)
    args = host_overhead.parse_args(["--steps", "2", "--warmup-steps", "1", "--max-tokens", "20", "--stream"])
    timer = host_overhead.instrument(llm, time.perf_counter)
    host_overhead.instrument_scheduler(llm.engine, timer)
    result = host_overhead.measure(llm, timer, 4, args)
    assert all(result[phase] > 0 for phase in host_overhead.PHASES), result
    assert not llm.engine.has_unfinished_requests()  # the measured requests were aborted
