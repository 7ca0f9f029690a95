"""Quantization quality harness: weight memory, KV capacity, throughput, perplexity and greedy agreement
of each format against full precision, on the embedded SmolLM2-135M-Instruct.

Held-out text: the "Execution model" chapter of the Python Language Reference, which ships offline
inside the standard library (`pydoc_data.topics.topics["execmodel"]`), cut into windows of `--window`
tokens scored with prompt logprobs. Greedy agreement: for prompts taken from the same text, the share
of the full-precision greedy continuation each format reproduces before its first differing token.
Throughput is reported as a ratio to full precision measured in the same run (absolute times on a
shared machine mean little).

    python bench/quality.py                      # every format, markdown table on stdout
    python bench/quality.py --formats full int8 --window 256 --max-tokens 256
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from dataclasses import dataclass
from pydoc_data.topics import topics
from typing import Any

import torch

from pagoda import LLM, SamplingParams
from pagoda.quantization import weight_bytes

# name -> engine options; "full" is the reference: the file's float32 expansion
FULL: dict[str, Any] = {"quantization": "none", "dtype": "float32"}
FORMATS: dict[str, dict[str, Any]] = {
    "full": FULL,
    "int8": {**FULL, "quantization": "int8"},
    "fp8": {**FULL, "quantization": "fp8"},
    "gguf-q4_1": {**FULL, "quantization": "gguf"},  # the file's own Q4_1 blocks, multiplied without expanding
    "kv-fp8": {**FULL, "kv_cache_dtype": "fp8"},
    "int8+kv-fp8": {**FULL, "quantization": "int8", "kv_cache_dtype": "fp8"},
    "default": {},  # what LLM() picks: the GGUF blocks, bfloat16 where the CPU multiplies it natively
}
KV_CACHE_BYTES = 64 << 20  # the same pool for all, so the token capacities compare


def held_out_text() -> str:
    return topics["execmodel"]


@dataclass
class FormatReport:
    name: str
    weight_mib: float
    linear_weight_mib: float
    kv_tokens: int
    perplexity: float
    agreement: float
    prefill_seconds: float
    decode_seconds: float


def perplexity(llm: LLM, token_ids: list[int], window: int) -> float:
    """exp(mean negative log-likelihood) of every token after the first of each window."""
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids) - 1, window)]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for ids, output in zip(windows, outputs, strict=True):
        for token, entry in zip(ids[1:], output.prompt_logprobs[1:], strict=True):
            nll -= entry[token]
            count += 1
    return math.exp(nll / count)


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Mean share of each reference continuation reproduced before the first differing token."""
    shares = []
    for ref, cand in zip(reference, candidate, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), len(ref))
        shares.append(same / len(ref))
    return sum(shares) / len(shares)


def linear_weight_bytes(llm: LLM) -> int:
    model = llm.engine.runner.model
    return sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if hasattr(m, "quant_method")
        for t in m.quant_method.weight_tensors(m)
    )


def measure(
    name: str,
    options: dict[str, Any],
    args: argparse.Namespace,
    reference: list[list[int]] | None,
    text_ids: list[int],
    prompts: list[list[int]],
) -> tuple[FormatReport, list[list[int]]]:
    # no prefix caching: the timed second pass must recompute, and cached prompts lose their logprobs
    llm = LLM(kv_cache_memory=KV_CACHE_BYTES, max_model_len=2048, enable_prefix_caching=False, **options)
    ppl = perplexity(llm, text_ids, args.window)
    start = time.perf_counter()
    perplexity(llm, text_ids, args.window)  # again, timed: prefill-bound
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    continuations = greedy(llm, prompts, args.new_tokens)  # decode-bound
    decode = time.perf_counter() - start
    report = FormatReport(
        name=name,
        weight_mib=weight_bytes(llm.engine.runner.model) / 2**20,
        linear_weight_mib=linear_weight_bytes(llm) / 2**20,
        kv_tokens=llm.engine.kv_cache_tokens,
        perplexity=ppl,
        agreement=1.0 if reference is None else agreement(reference, continuations),
        prefill_seconds=prefill,
        decode_seconds=decode,
    )
    llm.engine.close()
    del llm
    gc.collect()
    return report, continuations


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens of held-out text scored")
    parser.add_argument("--prompts", type=int, default=8, help="greedy-agreement prompts (one batch)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    names = ["full", *[f for f in args.formats if f != "full"]]
    tokenizer = LLM(kv_cache_memory=16 << 20, max_model_len=256).get_tokenizer()
    text_ids = tokenizer.encode(held_out_text())[: args.max_tokens]
    # prompts: 32-token slices spread over the text
    step = max(1, (len(text_ids) - 32) // args.prompts)
    prompts = [text_ids[i * step : i * step + 32] for i in range(args.prompts)]

    reports: list[FormatReport] = []
    reference: list[list[int]] | None = None
    for name in names:
        report, continuations = measure(name, FORMATS[name], args, reference, text_ids, prompts)
        reference = continuations if reference is None else reference
        reports.append(report)
        print(f"# {name}: {report}", flush=True)

    full = reports[0]
    print(
        f"\n{len(text_ids)} tokens of pydoc_data.topics['execmodel'], windows of {args.window}; "
        f"{args.prompts} prompts x {args.new_tokens} greedy tokens; torch threads {args.threads}\n"
    )
    print(
        "| format | weights MiB (linear layers) | KV tokens in 64 MiB | perplexity | vs full | "
        "greedy agreement | prefill time vs full | decode time vs full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        cells = [
            r.name,
            f"{r.weight_mib:.1f} ({r.linear_weight_mib:.1f})",
            str(r.kv_tokens),
            f"{r.perplexity:.3f}",
            f"{100 * (r.perplexity / full.perplexity - 1):+.2f}%",
            f"{100 * r.agreement:.1f}%",
            f"{r.prefill_seconds / full.prefill_seconds:.2f}x",
            f"{r.decode_seconds / full.decode_seconds:.2f}x",
        ]
        print("| " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
