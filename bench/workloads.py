"""Benchmark workloads: token-id prompts of real English text, with ShareGPT-shaped lengths.

Lengths. ShareGPT's published statistics (the vLLM paper, Kwon et al., SOSP 2023, Fig. 11) give a mean
prompt of 161 tokens and a mean output of 338 tokens, both with long right tails. We draw each from a
log-normal with that mean and shape sigma (1.0 for prompts, 0.8 for outputs: our choice, giving the
heavy tail of the paper's histograms), multiply by `scale` (a 135M model on 2 CPU cores cannot serve
full-length ShareGPT traffic in a benchmark of minutes; every system gets the same scaled lengths) and
clip to [min_len, max_prompt] / [min_len, max_output]. Seeds are fixed, so every run and every system
sees the same requests.

Text. Prompts are windows of Python's own documentation: the stdlib module `pydoc_data.topics`
(the language reference's help topics, ~465 kB of English prose with code samples), tokenized with
the model's tokenizer. It ships with every CPython, so nothing is downloaded.

Every request sets ignore_eos with max_tokens = its output length, so every system produces exactly
the same number of tokens.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from bench.env import CACHE_DIR, embedded_gguf

SHAREGPT_PROMPT_MEAN = 161.0
SHAREGPT_OUTPUT_MEAN = 338.0
PROMPT_SIGMA = 1.0
OUTPUT_SIGMA = 0.8
TOKENIZER_DIR = CACHE_DIR / "tokenizer"
CORPUS_CACHE = CACHE_DIR / "corpus-pydoc-topics.json"


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: list[BenchRequest]

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    def head(self, n: int) -> Workload:
        return Workload(self.name, self.description, self.requests[:n])

    def summary(self) -> dict[str, Any]:
        prompts = [r.prompt_len for r in self.requests]
        outputs = [r.output_len for r in self.requests]
        return {
            "name": self.name,
            "description": self.description,
            "num_requests": len(self.requests),
            "prompt_tokens": {"mean": _mean(prompts), "min": min(prompts), "max": max(prompts)},
            "output_tokens": {"mean": _mean(outputs), "min": min(outputs), "max": max(outputs)},
        }


@dataclass(frozen=True)
class LengthSpec:
    """ShareGPT-shaped lengths scaled down by `scale` and clipped."""

    scale: float = 1.0
    min_len: int = 4
    max_prompt: int = 1024
    max_output: int = 1024

    def sample(self, rng: random.Random) -> tuple[int, int]:
        prompt = _lognormal(rng, SHAREGPT_PROMPT_MEAN * self.scale, PROMPT_SIGMA)
        output = _lognormal(rng, SHAREGPT_OUTPUT_MEAN * self.scale, OUTPUT_SIGMA)
        return (
            min(max(prompt, self.min_len), self.max_prompt),
            min(max(output, self.min_len), self.max_output),
        )


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    # a log-normal's mean is exp(mu + sigma^2 / 2): pick mu so that it equals `mean`
    mu = math.log(mean) - sigma**2 / 2
    return round(rng.lognormvariate(mu, sigma))


def _mean(values: list[int]) -> float:
    return round(sum(values) / len(values), 1)


@cache
def tokenizer() -> Any:
    """The model's own tokenizer (from the GGUF's metadata), cached as tokenizer.json after one load."""
    from transformers import AutoTokenizer

    if (TOKENIZER_DIR / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # slow: it parses the GGUF
    tok.save_pretrained(TOKENIZER_DIR)
    return tok


def corpus_token_ids() -> list[int]:
    """Python's documentation topics, tokenized once and cached."""
    if CORPUS_CACHE.exists():
        return json.loads(CORPUS_CACHE.read_text())
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer().encode(text, add_special_tokens=False)
    CORPUS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    CORPUS_CACHE.write_text(json.dumps(ids))
    return ids


def _window(corpus: list[int], length: int, rng: random.Random) -> list[int]:
    start = rng.randrange(0, len(corpus) - length)
    return corpus[start : start + length]


def sharegpt_workload(num_requests: int, lengths: LengthSpec, seed: int = 0) -> Workload:
    """Mixed prompt and output lengths: the workload where static batching wastes the most."""
    rng = random.Random(seed)
    corpus = corpus_token_ids()
    requests = []
    for _ in range(num_requests):
        prompt_len, output_len = lengths.sample(rng)
        requests.append(BenchRequest(_window(corpus, prompt_len, rng), output_len))
    description = (
        f"ShareGPT-shaped log-normal lengths x{lengths.scale:g} (prompt mean {SHAREGPT_PROMPT_MEAN:g}, "
        f"sigma {PROMPT_SIGMA}; output mean {SHAREGPT_OUTPUT_MEAN:g}, sigma {OUTPUT_SIGMA}), "
        f"clipped to [{lengths.min_len}, {lengths.max_prompt}] / [{lengths.min_len}, {lengths.max_output}]"
    )
    return Workload("sharegpt", description, requests)


def shared_prefix_workload(
    num_requests: int, system_len: int, lengths: LengthSpec, seed: int = 1
) -> Workload:
    """Chat requests that share one long system prompt: what automatic prefix caching is for.

    Each prompt is the ChatML conversation system(shared text) + user(own text), so the system
    turn's tokens are identical across requests and the user turns differ.
    """
    rng = random.Random(seed)
    corpus = corpus_token_ids()
    tok = tokenizer()
    system = tok.decode(_window(corpus, system_len, rng))
    requests = []
    for _ in range(num_requests):
        user_len, output_len = lengths.sample(rng)
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": tok.decode(_window(corpus, user_len, rng))},
        ]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        requests.append(BenchRequest(tok.encode(text, add_special_tokens=False), output_len))
    description = (
        f"a shared {system_len}-token system prompt + a ShareGPT-shaped user turn "
        f"(x{lengths.scale:g}) in the model's chat template"
    )
    return Workload("shared-prefix", description, requests)


def to_json(workload: Workload) -> dict[str, Any]:
    return {"name": workload.name, "description": workload.description,
            "requests": [asdict(r) for r in workload.requests]}


def from_json(data: dict[str, Any]) -> Workload:
    return Workload(data["name"], data["description"], [BenchRequest(**r) for r in data["requests"]])
