"""Per-request timings and the summaries the report shows (percentiles, throughput)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request as a client saw it; times in seconds from when the request was sent."""

    prompt_len: int
    output_len: int  # tokens requested (ignore_eos: the count every system must produce)
    num_output_tokens: int = 0  # tokens received
    ttft: float | None = None
    e2e: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each streamed token
    error: str | None = None

    @property
    def itls(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive streamed tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float]) -> dict[str, float | None]:
    return {
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def summarize(records: list[RequestRecord], wall_seconds: float) -> dict[str, Any]:
    """Throughput over the whole run plus TTFT / ITL / e2e distributions of the successful requests."""
    ok = [r for r in records if r.error is None]
    output_tokens = sum(r.num_output_tokens for r in ok)
    return {
        "num_requests": len(records),
        "num_errors": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "wall_seconds": wall_seconds,
        "prompt_tokens": sum(r.prompt_len for r in ok),
        "output_tokens": output_tokens,
        "requested_output_tokens": sum(r.output_len for r in records),
        "output_tokens_per_s": output_tokens / wall_seconds if wall_seconds > 0 else None,
        "requests_per_s": len(ok) / wall_seconds if wall_seconds > 0 else None,
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl_s": distribution([gap for r in ok for gap in r.itls]),
        "e2e_s": distribution([r.e2e for r in ok if r.e2e is not None]),
    }


def records_to_json(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """Records without the per-token times (they would bloat the results file)."""
    rows = []
    for r in records:
        row = asdict(r)
        del row["token_times"]
        rows.append(row)
    return rows
