"""`pagoda serve [MODEL]`: vLLM's flag names; every flag can also come from a PAGODA_<FLAG> variable.

Heavy imports (torch, the models, FastAPI) wait until after argument parsing, so `--help` is instant
and the cold-start log can report the import time on its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

from pagoda.entrypoints.reasoning import REASONING_PARSERS
from pagoda.entrypoints.tool_parsers import PARSERS as TOOL_CALL_PARSERS

ENV_PREFIX = "PAGODA_"
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def memory_size(text: str) -> int:
    """Bytes from '4294967296', '4GiB', '512MiB', '2G' ..."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 4GiB, 512MiB, 1073741824)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="A Hugging Face model directory or a .gguf file. Default: the embedded SmolLM2-135M-Instruct.",
    )
    server = parser.add_argument_group("HTTP server")
    server.add_argument("--host", default="0.0.0.0", help="Address to listen on. Default: %(default)s.")
    server.add_argument("--port", type=int, default=8000, help="Port to listen on. Default: %(default)s.")
    server.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="Model name(s) the API answers to (the first one is reported). "
        "Default: the model's file or directory name.",
    )
    server.add_argument(
        "--api-key",
        default=None,
        help="Require 'Authorization: Bearer <key>' on the API (/health, /ready and "
        "/metrics stay open). Prefer PAGODA_API_KEY over the command line.",
    )
    server.add_argument(
        "--max-queue-len",
        type=_positive_int,
        default=None,
        help="Answer 429 when this many requests are already waiting. Default: no limit.",
    )
    server.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=30.0,
        help="Seconds in-flight requests get to finish after SIGTERM before they are "
        "aborted. Default: %(default)s.",
    )
    server.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="Log level. Default: %(default)s.",
    )
    server.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=False,
        help='Let the model decide when to call tools (tool_choice "auto"); needs --tool-call-parser. '
        "Default: off.",
    )
    server.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(TOOL_CALL_PARSERS),
        help="How the model writes tool calls: hermes (Hermes, Qwen2.5, Qwen3), llama3_json (Llama 3.x), "
        "mistral. Default: none.",
    )
    server.add_argument(
        "--reasoning-parser",
        default=None,
        choices=sorted(REASONING_PARSERS),
        help="Return a thinking model's <think>...</think> as reasoning_content, apart from content.",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument("--tokenizer", default=None, help="Tokenizer directory. Default: the model's own.")
    engine.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16"],
        help="Weights and activations dtype. auto: the checkpoint's half type (bfloat16 for a quantized "
        "GGUF file) on a GPU and on CPUs with native bfloat16 (AVX512-BF16, AMX); float32 otherwise, and "
        "for float32 checkpoints on the CPU.",
    )
    engine.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="Where to run. auto: a GPU if there is one.",
    )
    engine.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="Longest prompt + completion in tokens. Default: the model's context length.",
    )
    engine.add_argument(
        "--block-size",
        type=_positive_int,
        default=16,
        help="Tokens per KV-cache block (a power of two). Default: %(default)s.",
    )
    engine.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=0.9,
        help="Fraction of GPU memory for weights, activations and the KV cache (GPU). Default: %(default)s.",
    )
    engine.add_argument(
        "--kv-cache-memory",
        type=memory_size,
        default=None,
        help="KV-cache size on CPU, in bytes or with a unit (4GiB, 512MiB).",
    )
    engine.add_argument(
        "--num-gpu-blocks-override",
        type=_positive_int,
        default=None,
        help="Force the number of KV-cache blocks (testing).",
    )
    engine.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=256,
        help="Most sequences in one batch. Default: %(default)s.",
    )
    engine.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        default=2048,
        help="Token budget of one engine step (prefill chunks + decodes). Default: %(default)s.",
    )
    engine.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Reuse the KV cache of shared prompt prefixes. Default: on.",
    )
    engine.add_argument(
        "--tensor-parallel-size",
        type=_positive_int,
        default=1,
        help="GPUs to shard the model over. Default: %(default)s.",
    )
    engine.add_argument(
        "--quantization",
        choices=["none", "int8", "fp8", "gguf"],
        default=None,
        help="Weight quantization: none (full precision; expands a GGUF file's blocks), int8 (W8A16), "
        "fp8 (e4m3), or gguf (keep a GGUF file's blocks). Default: gguf for a quantized GGUF file "
        "(without tensor parallelism), none otherwise.",
    )
    engine.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8", "fp8_e4m3"],
        default="auto",
        help="KV-cache element type; fp8 doubles the tokens that fit. Default: %(default)s.",
    )
    engine.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Never capture CUDA graphs. Default: off.",
    )
    engine.add_argument(
        "--seed", type=int, default=0, help="Random seed of the engine. Default: %(default)s."
    )


def apply_env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    """Make PAGODA_<FLAG> (e.g. PAGODA_MAX_MODEL_LEN) the default of each flag; the command line wins."""
    for action in parser._actions:
        if action.dest in ("help", argparse.SUPPRESS):
            continue
        raw = environ.get(ENV_PREFIX + action.dest.upper())
        if raw is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if raw.strip().lower() not in _TRUE | _FALSE:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()} must be true or false, got {raw!r}")
            action.default = raw.strip().lower() in _TRUE
        elif action.nargs == "+":
            action.default = raw.replace(",", " ").split()
        else:
            # argparse converts a string default with the flag's type, but does not check its choices
            if action.choices is not None and raw not in action.choices:
                parser.error(f"{ENV_PREFIX}{action.dest.upper()}: invalid choice {raw!r}")
            action.default = raw
        if action.help and action.help != argparse.SUPPRESS:
            action.help += f" [env {ENV_PREFIX}{action.dest.upper()} is set]"


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagoda", description="Pagoda: paged-KV, continuous-batching LLM serving."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve a model over the OpenAI-compatible HTTP API.",
        description="Serve a model over an OpenAI-compatible HTTP API. Every flag can also be set with an "
        f"environment variable {ENV_PREFIX}<FLAG> (upper case, dashes as underscores), e.g. "
        f"{ENV_PREFIX}MAX_MODEL_LEN=2048; the command line wins.",
    )
    add_serve_arguments(serve)
    apply_env_defaults(serve, dict(os.environ) if environ is None else environ)
    return parser


def serve(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # torch and the model code load here; the engine thread then loads and warms up the model
    import pagoda.engine.llm_engine  # noqa: F401
    from pagoda.config import EngineConfig
    from pagoda.entrypoints.api_server import ServerSettings, run_server
    from pagoda.entrypoints.constraints import ToolOptions

    import_seconds = time.perf_counter() - start
    config = EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
    )
    settings = ServerSettings(
        served_model_names=args.served_model_name,
        api_key=args.api_key,
        max_queue_len=args.max_queue_len,
        shutdown_timeout=args.shutdown_timeout,
        import_seconds=import_seconds,
        tool_options=ToolOptions(args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser),
    )
    logging.getLogger("pagoda.server").info("imports done in %.2f s; loading the model", import_seconds)
    return run_server(config, settings, args.host, args.port, args.log_level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser")
    if args.command == "serve":
        try:
            return serve(args)
        except ValueError as error:  # a bad engine option (EngineConfig validates): say it, no traceback
            print(f"pagoda serve: error: {error}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
