"""The Hugging Face `transformers` peer: static batching, and one request at a time.

Static batching is the pipeline the vLLM blog compares against: requests go in fixed batches
(left-padded), and each batch runs until its longest request has all its tokens, so the short ones
idle in the batch. Only the tokens each request asked for count as output.

The model is the same embedded GGUF, dequantized to fp32 by `from_pretrained(gguf_file=...)`. That
takes a while, so the result is cached under bench/.cache/hf-smollm2 (config + safetensors; written by
hand, since transformers refuses to `save_pretrained` a GGUF-loaded model).
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from bench.env import CACHE_DIR, embedded_gguf, peak_rss_bytes
from bench.workloads import BenchRequest, Workload

HF_DIR = CACHE_DIR / "hf-smollm2"

def load_model() -> tuple[Any, float]:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    if (HF_DIR / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    else:
        gguf = embedded_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _save_dequantized(model)
    model.eval()
    return model, time.perf_counter() - start


def _save_dequantized(model: Any) -> None:
    from safetensors.torch import save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain fp32 now
    HF_DIR.mkdir(parents=True, exist_ok=True)
    (HF_DIR / "config.json").write_text(json.dumps(config, indent=1))
    save_model(model, str(HF_DIR / "model.safetensors"))  # handles the tied lm_head


def _left_padded(requests: list[BenchRequest], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.prompt_len for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for row, r in enumerate(requests):
        ids[row, width - r.prompt_len :] = torch.tensor(r.prompt_token_ids)
        mask[row, width - r.prompt_len :] = 1
    return ids, mask


def generate_batch(model: Any, requests: list[BenchRequest]) -> int:
    """Greedy-generate for one static batch until its longest request is done; returns the steps run.

    min_new_tokens = max_new_tokens keeps EOS from ending anything early (ignore_eos).
    """
    pad_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    ids, mask = _left_padded(requests, pad_id)
    steps = max(r.output_len for r in requests)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
            do_sample=False, pad_token_id=pad_id,
        )
    return out.shape[1] - ids.shape[1]


def run(workload: Workload, batch_size: int) -> dict[str, Any]:
    """Batches of `batch_size` in workload order (batch_size 1: one request at a time)."""
    model, load_seconds = load_model()
    generate_batch(model, [BenchRequest([1, 2, 3, 4], 4)] * min(batch_size, 2))  # warm-up
    e2e: list[float] = []
    generated = 0
    matched = True
    start = time.perf_counter()
    for i in range(0, len(workload.requests), batch_size):
        batch = workload.requests[i : i + batch_size]
        batch_start = time.perf_counter()
        steps = generate_batch(model, batch)
        # every request in a static batch returns when the whole batch does
        e2e += [time.perf_counter() - batch_start] * len(batch)
        generated += steps * len(batch)
        matched &= steps == max(r.output_len for r in batch)
    wall = time.perf_counter() - start
    useful = workload.num_output_tokens
    return {
        "batch_size": batch_size,
        "load_seconds": load_seconds,
        "wall_seconds": wall,
        "num_requests": len(workload.requests),
        "prompt_tokens": workload.num_prompt_tokens,
        "output_tokens": useful,
        "requested_output_tokens": useful,
        "output_tokens_match": matched,
        "generated_tokens": generated,  # including the tokens short requests idle through
        "output_tokens_per_s": useful / wall,
        "requests_per_s": len(workload.requests) / wall,
        "e2e_latencies": e2e,
        "peak_rss_bytes": peak_rss_bytes(),
    }
