"""Cold start of `pagoda serve` alone: `python -m bench.cold_start --runs 5`.

The same measurement as bench.run's `cold-start` system (process start to the first 200 from /ready, and
the import / load / warm-up split the server logs), without the rest of the benchmark; prints each run and
the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench.online import cold_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")
    args = parser.parse_args()
    runs = cold_start(args.runs)["runs"]
    if args.json:
        print(json.dumps(runs))
    keys = ("process_to_ready_s", "import_s", "load_s", "warmup_s")
    print(" ".join(f"{key:>18}" for key in keys))
    for run in runs:
        print(" ".join(f"{run.get(key) or float('nan'):18.2f}" for key in keys))
    medians = [statistics.median(r[key] for r in runs if r.get(key) is not None) for key in keys]
    print("median " + " ".join(f"{m:.2f}" for m in medians))


if __name__ == "__main__":
    main()
