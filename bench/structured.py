"""Structured outputs' cost: output tok/s with a JSON-schema constraint against the same requests
unconstrained (1 and 32 concurrent sequences, offline engine, embedded SmolLM2 unless --model), the time
spent filling and applying grammar bitmasks per step (only for draws the grammar rejected), and the time
to build a schema's grammar cold and from the cache.

    PYTHONPATH=server python -m bench.structured [--model DIR] [--tokens 64] [--streams 1,32]

Both runs generate exactly --tokens per sequence: the schema (an open-ended array of short strings) never
completes first, and the unconstrained run ignores EOS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

SCHEMA = {
    "type": "object",
    "properties": {
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1000}
    },
    "required": ["notes"],
    "additionalProperties": False,
}


def compile_times(engine: Any, repeats: int = 20) -> dict[str, float]:
    """Milliseconds: the tokenizer's one-off conversion, a new schema (cold) and a seen one (cached), the
    latter including the per-sequence matcher copy a request makes."""
    from pagoda.structured_outputs import StructuredOutputsParams

    start = time.perf_counter()
    compiler = engine.grammar_compiler
    compiler.tokenizer  # noqa: B018 - built on first use
    tokenizer_ms = (time.perf_counter() - start) * 1e3
    cold, cached = [], []
    for i in range(repeats):
        schema = {**SCHEMA, "properties": {f"field_{i}": {"type": "integer"}, **SCHEMA["properties"]}}
        spec = StructuredOutputsParams(json=schema)
        start = time.perf_counter()
        compiler.matcher(spec)
        cold.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        compiler.matcher(StructuredOutputsParams(json=json.loads(json.dumps(schema))))
        cached.append((time.perf_counter() - start) * 1e3)
    return {
        "tokenizer_setup_ms": tokenizer_ms,
        "compile_cold_ms_median": statistics.median(cold),
        "compile_cached_ms_median": statistics.median(cached),
    }


def throughput(llm: Any, streams: int, tokens: int, constrained: bool) -> dict[str, float]:
    import pagoda.structured_outputs.bitmask as bitmask_module
    from pagoda import SamplingParams
    from pagoda.structured_outputs import StructuredOutputsParams

    spec = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = SamplingParams(
        temperature=0.0, max_tokens=tokens, ignore_eos=not constrained, structured_outputs=spec
    )
    prompts = [f"Write note number {i} about the sea, as JSON." for i in range(streams)]
    mask_seconds = [0.0]
    original = bitmask_module.apply_grammar_masks

    def timed(logits: Any, seqs: Any, rows: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(logits, seqs, rows)
        finally:
            mask_seconds[0] += time.perf_counter() - start

    bitmask_module.apply_grammar_masks = timed
    try:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    finally:
        bitmask_module.apply_grammar_masks = original
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == streams * tokens, f"expected {streams * tokens} tokens, got {produced}"
    return {
        "output_tok_per_s": produced / wall,
        "wall_s": wall,
        "mask_ms_per_step": mask_seconds[0] * 1e3 / tokens,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", default="1,32")
    args = parser.parse_args(argv)
    from pagoda import LLM

    llm = LLM(model=args.model, max_model_len=512)
    results: dict[str, Any] = {"compile": compile_times(llm.engine)}
    print(json.dumps(results), flush=True)
    throughput(llm, 2, 4, constrained=False)  # warm-up
    for streams in (int(s) for s in args.streams.split(",")):
        free = throughput(llm, streams, args.tokens, constrained=False)
        constrained = throughput(llm, streams, args.tokens, constrained=True)
        overhead = 1 - constrained["output_tok_per_s"] / free["output_tok_per_s"]
        results[f"{streams}_streams"] = {
            "unconstrained": free, "json_schema": constrained, "overhead": overhead
        }
        print(json.dumps({f"{streams}_streams": results[f"{streams}_streams"]}), flush=True)
    return results


if __name__ == "__main__":
    main()
