"""GPU offline throughput: Pagoda against transformers on a ~0.5B model with random weights, one run.

The model has Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query / 2 KV heads, vocab 151936) and
random weights in bfloat16 (no hub access). Requests are random token ids with prompt lengths uniform in
[64, 512] and output lengths uniform in [64, 256], ignore_eos, greedy, fixed seed. transformers runs
static batches (`generate` on left-padded batches of `--hf-batch`, each until its longest request ends);
Pagoda takes all requests at once (continuous batching) and, for reference, one at a time; with its
CUDA graphs and again with `enforce_eager`. Needs CUDA.

    python -m bench.gpu_offline --requests 256 --hf-requests 64 --out docs/bench-gpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)


def make_model(path: Path) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_05B, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(10, 150000) for _ in range(rng.randint(64, 512))], rng.randint(64, 256))
        for _ in range(n)
    ]


def run_pagoda(
    path: Path, requests: list[tuple[list[int], int]], single: int, enforce_eager: bool
) -> dict[str, Any]:
    from pagoda import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=str(path), max_model_len=1024, max_num_seqs=256, max_num_batched_tokens=8192,
        enforce_eager=enforce_eager,
    )
    load = time.perf_counter() - start

    def generate(batch: list[tuple[list[int], int]]) -> tuple[float, int]:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in batch]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], params, use_tqdm=False)
        wall = time.perf_counter() - t0
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        assert produced == sum(n for _, n in batch)
        return wall, produced

    generate(requests[:8])  # warm-up: Triton compiles its kernels for these shapes
    wall, produced = generate(requests)
    single_wall, single_produced = generate(requests[:1]) if single else (0.0, 0)
    for p in requests[1:single]:
        w, n = generate([p])
        single_wall, single_produced = single_wall + w, single_produced + n
    return {
        "load_seconds": load,
        "batched_output_tokens_per_s": produced / wall,
        "batched_total_tokens_per_s": (produced + sum(len(p) for p, _ in requests)) / wall,
        "single_output_tokens_per_s": single_produced / single_wall if single else None,
        "kv_blocks": llm.engine.runner.num_blocks,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def run_transformers(path: Path, requests: list[tuple[list[int], int]], batch_size: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    produced = 0

    def generate(batch: list[tuple[list[int], int]]) -> int:
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device="cuda")
        longest = max(n for _, n in batch)
        # a static batch runs until its longest request ends; shorter ones count only their own tokens
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=0,
        )
        return sum(n for _, n in batch)

    with torch.inference_mode():
        generate(requests[:2])
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(requests), batch_size):
            produced += generate(requests[i : i + batch_size])
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return {"static_batch": batch_size, "output_tokens_per_s": produced / wall, "requests": len(requests)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--hf-requests", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, default=32)
    parser.add_argument("--single", type=int, default=2, help="requests Pagoda also runs one at a time")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    requests = workload(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        params = make_model(Path(tmp))
        pagoda = run_pagoda(Path(tmp), requests, args.single, enforce_eager=False)
        torch.cuda.empty_cache()
        eager = run_pagoda(Path(tmp), requests, args.single, enforce_eager=True)
        torch.cuda.empty_cache()
        hf = run_transformers(Path(tmp), requests[: args.hf_requests], args.hf_batch)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "parameters": params,
        "requests": len(requests),
        "pagoda": pagoda,
        "pagoda_enforce_eager": eager,
        "transformers": hf,
        "ratio_vs_static_batching": pagoda["batched_output_tokens_per_s"] / hf["output_tokens_per_s"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
