"""Throughput of a small random mixture-of-experts model: Pagoda (offline or served) against transformers.

    .venv/bin/python -m bench.moe                     # Qwen3-MoE-shaped, ~2 minutes on 2 cores
    .venv/bin/python -m bench.moe --family mixtral --requests 32 --output-len 64
    .venv/bin/python -m bench.moe --served --concurrency 8   # `pagoda serve`, 8 streaming clients

A Qwen3-MoE (or Mixtral) of random weights, small enough for a CPU run (hidden 512, 8 layers, 16
experts of 256 features, top-4: ~100M parameters, ~30M active per token). Same fixed-length requests,
greedy, `ignore_eos`, on both systems; transformers uses static left-padded batches of 8 (every
request has the same length, so no padding is wasted). Weights and activations in float32.

`--served` runs `pagoda serve` on the same directory instead of the offline engine: `--concurrency`
streaming clients (`bench.clients`, token-id prompts to /v1/completions) each send their next request as
soon as the previous one ends; the figure is output tokens over the whole run's wall time, with TTFT and
inter-token latency percentiles. The directory gets a word-level tokenizer over the whole vocabulary, so
the server detokenizes every token as it would for a real model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.env import cpu_model, num_cores

VOCAB_SIZE = 32000

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": (
        "qwen3_moe",
        {"num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 256, "norm_topk_prob": True},
    ),
    "mixtral": ("mixtral", {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 512}),
}


def make_model(family: str, path: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = FAMILIES[family]
    shape: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 512,
        "intermediate_size": 1024,  # a dense MLP's, where the family has one; Mixtral's experts override it
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 2048,
    }
    config = AutoConfig.for_model(model_type, **(shape | overrides))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def save_word_tokenizer(path: Path) -> None:
    """A tokenizer with one word per id of the vocabulary: what `pagoda serve` detokenizes the stream with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB_SIZE)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)


def run_pagoda(path: Path, prompts: list[list[int]], output_len: int) -> float:
    from pagoda import LLM, SamplingParams

    llm = LLM(model=str(path), max_model_len=512, skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return len(prompts) * output_len / elapsed


def run_served(path: Path, prompts: list[list[int]], output_len: int, concurrency: int) -> dict[str, Any]:
    from bench.clients import run_concurrent
    from bench.servers import ServerProcess, free_port, pagoda_serve_command
    from bench.workloads import BenchRequest, Workload

    save_word_tokenizer(path)
    port = free_port()
    args = [str(path), "--served-model-name", "moe", "--max-model-len", "512"]
    warm_up = Workload("warm-up", "", [BenchRequest(prompts[0], 2)])
    workload = Workload("moe", "", [BenchRequest(p, output_len) for p in prompts])
    with ServerProcess("pagoda-moe", pagoda_serve_command(port, args), port, "/ready").start() as server:
        asyncio.run(run_concurrent(server.base_url, "moe", warm_up, 1))
        result = asyncio.run(run_concurrent(server.base_url, "moe", workload, concurrency))
    if result["num_errors"] or result["output_tokens"] != len(prompts) * output_len:
        raise RuntimeError(f"the served run did not produce every token: {result['errors']}")
    return {
        "pagoda_serve_tok_s": round(result["output_tokens_per_s"], 1),
        "concurrency": concurrency,
        "ttft_s": result["ttft_s"],
        "itl_s": result["itl_s"],
    }


@torch.no_grad()
def run_transformers(path: Path, prompts: list[list[int]], output_len: int, batch: int = 8) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    kwargs = {"max_new_tokens": output_len, "min_new_tokens": output_len, "do_sample": False}
    model.generate(torch.tensor(prompts[:1]), max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[first : first + batch])  # equal lengths: no padding
        model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)
    return len(prompts) * output_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen3_moe")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--served", action="store_true", help="pagoda serve + streaming clients")
    parser.add_argument("--concurrency", type=int, default=8, help="streaming clients (with --served)")
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB_SIZE) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        params = make_model(args.family, path)
        result = {
            "family": args.family,
            "parameters": params,
            "requests": args.requests,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "cpu": cpu_model(),
            "cores": num_cores(),
        }
        if args.served:
            result.update(run_served(path, prompts, args.output_len, args.concurrency))
        else:
            result["pagoda_tok_s"] = round(run_pagoda(path, prompts, args.output_len), 1)
        result["transformers_tok_s"] = round(run_transformers(path, prompts, args.output_len), 1)
    pagoda = result["pagoda_serve_tok_s" if args.served else "pagoda_tok_s"]
    result["speedup"] = round(pagoda / result["transformers_tok_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
