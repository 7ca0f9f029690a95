"""Issue 14's held-out mixed-length offline workload on the embedded model: 32 prompts of 8-120 words,
16-160 output tokens each (ignore_eos), all submitted at once; prints output tok/s.

An A/B of two checkouts on one machine: `PYTHONPATH=<checkout>/server python -m bench.offline_mixed NAME`
for each, alternating them a few times (one run's spread on a 2-core host is +-15%). `--transformers`
also runs the same requests (the same token ids, the same output lengths) through `transformers`
static batches of 8 in the same process, after Pagoda, and prints the ratio.
"""

from __future__ import annotations

import argparse
import random
import time

from pagoda import LLM, SamplingParams

WORDS = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "at",
    "this", "have", "from", "or", "one", "had", "not", "but", "what", "all",
]


def workload() -> tuple[list[str], list[int]]:
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 120))) for _ in range(32)]
    return prompts, [rng.randint(16, 160) for _ in prompts]


def run_pagoda(llm: LLM, prompts: list[str], output_lens: list[int]) -> float:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm caches
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == sum(output_lens), "every request must produce exactly its max_tokens"
    return tokens / elapsed


def run_transformers(llm: LLM, prompts: list[str], output_lens: list[int]) -> float:
    from bench import hf_baseline
    from bench.workloads import BenchRequest, Workload

    tokenizer = llm.get_tokenizer()
    requests = [BenchRequest(tokenizer.encode(p), n) for p, n in zip(prompts, output_lens, strict=True)]
    result = hf_baseline.run(Workload("mixed", "issue 14 mixed-length", requests), batch_size=8)
    assert result["output_tokens_match"]
    return float(result["output_tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="pagoda", help="label of this checkout in the output")
    parser.add_argument("--transformers", action="store_true", help="also transformers, batches of 8")
    args = parser.parse_args()
    prompts, output_lens = workload()
    llm = LLM()
    pagoda_rate = run_pagoda(llm, prompts, output_lens)
    print(f"{args.name}: {sum(output_lens)} tokens, {pagoda_rate:.1f} tok/s", flush=True)
    if args.transformers:
        hf_rate = run_transformers(llm, prompts, output_lens)
        print(f"transformers, static batches of 8: {hf_rate:.1f} tok/s; ratio {pagoda_rate / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
