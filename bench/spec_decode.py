"""Speculative decoding on an input-grounded workload: one stream, ngram prompt lookup against none.

The workload asks the embedded SmolLM2-135M-Instruct to rewrite a given passage (windows of Python's
documentation topics, `pydoc_data.topics`, which ships with CPython), the kind of request whose output
copies long runs of its input. Requests run one at a time (a single stream), greedy, to max_tokens or
EOS; both engines are loaded side by side and take turns on the same prompts. Reports output tok/s,
the acceptance rate, and whether the greedy outputs are identical.

`--served`: the same requests as one client through HTTP (`/v1/chat/completions`), taking turns between
`pagoda serve` without speculation, `pagoda serve --speculative-config` (ngram) and llama.cpp's
`llama-server` (built by `python -m bench.llamacpp`) on the same GGUF, each with the machine's cores;
output tok/s is each system's completion tokens over its requests' wall time (prefill included).

    python -m bench.spec_decode --prompts 3 --max-tokens 128
    python -m bench.spec_decode --served --prompts 6 --words 120 --max-tokens 200
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

INSTRUCTION = "Rewrite the following text exactly, correcting only spelling mistakes:\n\n"


def passages(num: int, words: int) -> list[str]:
    """`num` passages of about `words` words, from evenly spaced documentation topics."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [topics[keys[i * len(keys) // num]] for i in range(num)]
    return [" ".join(text.split()[:words]) for text in chosen]


def load(config: dict[str, Any] | None) -> Any:
    from pagoda import LLM, SamplingParams

    llm = LLM(speculative_config=config, max_model_len=2048)
    llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=4), use_tqdm=False)
    return llm


def one_stream(llm: Any, text: str, max_tokens: int) -> tuple[list[int], float]:
    """One request alone: its greedy output and its wall time."""
    from pagoda import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    start = time.perf_counter()
    out = llm.chat([{"role": "user", "content": INSTRUCTION + text}], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), time.perf_counter() - start


def summary(llm: Any, outputs: list[list[int]], seconds: float) -> dict[str, Any]:
    stats = llm.engine.get_stats()
    tokens = sum(len(o) for o in outputs)
    return {
        "output_tokens": tokens,
        "seconds": round(seconds, 2),
        "output_tokens_per_s": round(tokens / seconds, 2),
        "draft_tokens": stats.spec_decode_num_draft_tokens,
        "accepted_tokens": stats.spec_decode_num_accepted_tokens,
        "acceptance_rate": round(
            stats.spec_decode_num_accepted_tokens / max(stats.spec_decode_num_draft_tokens, 1), 3
        ),
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two outputs differ; None if they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--words", type=int, default=120, help="words per passage")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--served", action="store_true", help="through pagoda serve, against llama.cpp")
    args = parser.parse_args(argv)
    texts = passages(args.prompts, args.words)
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
             "prompt_lookup_max": 4}
    if args.served:
        return served(texts, ngram, args.max_tokens)
    engines = {"off": load(None), "ngram": load(ngram)}
    outputs: dict[str, list[list[int]]] = {name: [] for name in engines}
    seconds = dict.fromkeys(engines, 0.0)
    for text in texts:  # alternate the two engines, so a drifting machine load hits both alike
        for name, llm in engines.items():
            tokens, wall = one_stream(llm, text, args.max_tokens)
            outputs[name].append(tokens)
            seconds[name] += wall
            print(f"{name}: {len(tokens)} tokens in {wall:.1f} s", flush=True)
    off, on = (summary(engines[n], outputs[n], seconds[n]) for n in ("off", "ngram"))
    result = {
        "workload": f"{args.prompts} rewrite requests of {args.words} words, greedy, "
        f"max_tokens {args.max_tokens}",
        "off": off,
        "ngram": on,
        "speedup": round(on["output_tokens_per_s"] / off["output_tokens_per_s"], 2),
        "identical_outputs": outputs["ngram"] == outputs["off"],
        # per prompt: the first output position where the two differ (None: identical)
        "first_difference": [
            first_difference(x, y) for x, y in zip(outputs["off"], outputs["ngram"], strict=True)
        ],
    }
    print(json.dumps(result, indent=2))
    return result


def served(texts: list[str], ngram: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    import httpx

    from bench import llamacpp
    from bench.env import embedded_gguf, num_cores
    from bench.servers import ServerProcess, free_port, pagoda_serve_command

    def pagoda(name: str, extra: list[str]) -> ServerProcess:
        port = free_port()
        command = pagoda_serve_command(port, ["--max-model-len", "2048", *extra])
        return ServerProcess(name, command, port, "/ready")

    port = free_port()
    llama_command = llamacpp.server_command(
        llamacpp.SERVER_BINARY, embedded_gguf(), port, parallel=1, threads=num_cores(), ctx_per_slot=2048
    )
    servers = {
        "pagoda": pagoda("spec-off", []),
        "pagoda-ngram": pagoda("spec-ngram", ["--speculative-config", json.dumps(ngram)]),
        "llama.cpp": ServerProcess("spec-llamacpp", llama_command, port, "/health"),
    }
    tokens = dict.fromkeys(servers, 0)
    seconds = dict.fromkeys(servers, 0.0)
    try:
        for server in servers.values():
            server.start()
        with httpx.Client(timeout=600.0) as client:
            for server in servers.values():  # first-request costs stay out of the figures
                warm_up = {"model": "SmolLM2-135M-Instruct", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Say hi."}]}
                client.post(server.base_url + "/v1/chat/completions", json=warm_up).raise_for_status()
            for text in texts:  # the systems take turns, so a drifting machine load hits all alike
                for name, server in servers.items():
                    body = {
                        "model": "SmolLM2-135M-Instruct",
                        "messages": [{"role": "user", "content": INSTRUCTION + text}],
                        "max_tokens": max_tokens,
                        "temperature": 0.0,
                    }
                    start = time.perf_counter()
                    response = client.post(server.base_url + "/v1/chat/completions", json=body)
                    response.raise_for_status()
                    seconds[name] += time.perf_counter() - start
                    tokens[name] += response.json()["usage"]["completion_tokens"]
                    print(f"{name}: {tokens[name]} tokens in {seconds[name]:.1f} s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    rate = {name: tokens[name] / seconds[name] for name in servers}
    result = {
        "workload": f"{len(texts)} rewrite requests, one client, greedy, max_tokens {max_tokens}",
        "output_tokens": tokens,
        "output_tokens_per_s": {name: round(r, 2) for name, r in rate.items()},
        "pagoda_vs_llamacpp": round(rate["pagoda"] / rate["llama.cpp"], 2),
        "pagoda_ngram_vs_llamacpp": round(rate["pagoda-ngram"] / rate["llama.cpp"], 2),
        "ngram_speedup": round(rate["pagoda-ngram"] / rate["pagoda"], 2),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
