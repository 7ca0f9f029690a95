"""Issue 14's held-out mixed-length offline workload on the embedded model: 32 prompts of 8-120 words,
16-160 output tokens each (ignore_eos), all submitted at once; prints output tok/s.

An A/B of two checkouts on one machine: `PYTHONPATH=<checkout>/server python -m bench.offline_mixed NAME`
for each, alternating them a few times (one run's spread on a 2-core host is +-15%).
"""

from __future__ import annotations

import random
import sys
import time

from pagoda import LLM, SamplingParams

WORDS = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "at",
    "this", "have", "from", "or", "one", "had", "not", "but", "what", "all",
]


def main() -> None:
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 120))) for _ in range(32)]
    params = [
        SamplingParams(temperature=0, max_tokens=rng.randint(16, 160), ignore_eos=True) for _ in prompts
    ]
    llm = LLM()
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm caches
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    name = sys.argv[1] if len(sys.argv) > 1 else "pagoda"
    print(f"{name}: {tokens} tokens in {elapsed:.1f} s = {tokens / elapsed:.1f} tok/s")


if __name__ == "__main__":
    main()
