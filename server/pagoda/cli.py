"""`pagoda serve [MODEL]`: vLLM's flag names; every flag can also come from a PAGODA_<FLAG> variable.

Heavy imports (torch, the models, FastAPI) wait until after argument parsing, so `--help` is instant
and the cold-start log can report the import time on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
import typing
from collections.abc import Callable
from typing import Any

from pagoda.config import EngineConfig, memory_size, positive
from pagoda.entrypoints.reasoning import REASONING_PARSERS
from pagoda.entrypoints.tool_parsers import PARSERS as TOOL_CALL_PARSERS

__all__ = ["add_serve_arguments", "build_parser", "engine_config", "main", "memory_size"]

ENV_PREFIX = "PAGODA_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _cli_type(
    parse: Callable[[str], Any], check: Callable[[Any], None] | None = None
) -> Callable[[str], Any]:
    """A flag's argparse type: parse the text, then check the value; argparse prints the error."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
            if check is not None:
                check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names it in its errors
    return convert


_positive_int = _cli_type(int, positive)


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_engine_arguments(group: argparse._ArgumentGroup) -> None:
    """One flag per EngineConfig option that has help text, all generated from the field's metadata."""
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        if meta.get("help") is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if bool in (typing.get_args(hints[f.name]) or (hints[f.name],)):  # bool, or bool | None = auto
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"]
            )
            continue
        # `int | None` -> int: None is the default, never typed in
        base = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        group.add_argument(
            flag,
            type=_cli_type(meta["parse"] or base, meta["check"]),
            choices=meta["choices"],
            default=f.default,
            help=meta["help"],
        )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of parsed `serve` arguments: the model and every generated engine flag."""
    flags = [f.name for f in dataclasses.fields(EngineConfig) if f.metadata.get("help")]
    options = {name: getattr(args, name) for name in flags}
    return EngineConfig(model=args.model, **options)


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
        help="Answer 429 when this many sequences (n per prompt) would be waiting. Default: no limit.",
    )
    server.add_argument(
        "--http-read-timeout",
        type=non_negative_float,
        default=60.0,
        help="Seconds a client gets to send a request's headers, and then its body, before the "
        "connection is dropped (408 for a body); 0 waits forever. Default: %(default)s.",
    )
    server.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="Accept a chat template in the request (chat_template); without it such requests get 400.",
    )
    server.add_argument(
        "--shutdown-timeout",
        type=non_negative_float,
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
        help="Return a thinking model's reasoning as reasoning_content, apart from content: "
        "<think>...</think> (qwen3, deepseek_r1) or gpt-oss's harmony analysis channel (openai_gptoss).",
    )
    add_engine_arguments(parser.add_argument_group("engine"))


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
    from pagoda.router.main import ARGUMENTS_HELP, add_router_arguments  # argparse only, no aiohttp

    router = commands.add_parser(
        "router",
        help=ARGUMENTS_HELP,
        description=f"{ARGUMENTS_HELP} Every flag can also be set with {ENV_PREFIX}<FLAG>.",
    )
    add_router_arguments(router)
    apply_env_defaults(router, dict(os.environ) if environ is None else environ)
    return parser


def serve(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = engine_config(args)
    # torch and the model code load here; the model starts loading at once, while the HTTP server's
    # modules import, and the engine thread takes the engine over to warm it up
    import pagoda.engine.llm_engine  # noqa: F401

    engine_factory = _start_loading(config)
    from pagoda.entrypoints.api_server import ServerSettings, run_server
    from pagoda.entrypoints.constraints import ToolOptions

    import_seconds = time.perf_counter() - start
    settings = ServerSettings(
        served_model_names=args.served_model_name,
        api_key=args.api_key,
        max_queue_len=args.max_queue_len,
        shutdown_timeout=args.shutdown_timeout,
        http_read_timeout=args.http_read_timeout,
        trust_request_chat_template=args.trust_request_chat_template,
        import_seconds=import_seconds,
        tool_options=ToolOptions(args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser),
    )
    logging.getLogger("pagoda.server").info("imports done in %.2f s; the model is loading", import_seconds)
    return run_server(config, settings, args.host, args.port, args.log_level, engine_factory)


def _start_loading(config: EngineConfig) -> Callable[[EngineConfig], Any] | None:
    """On the CPU, start building the engine on a thread now: the weights' tensor work (which releases the
    GIL) then overlaps the HTTP server's imports, about a second of cold start. Returns the engine factory
    for the engine thread, which waits for the engine (or raises what loading raised); None on GPUs, where
    the engine thread builds its engine itself (CUDA graphs are captured and replayed on one thread)."""
    if config.torch_device.type != "cpu":
        return None
    from concurrent.futures import Future

    from pagoda.engine.llm_engine import LLMEngine

    engine: Future[LLMEngine] = Future()

    def load() -> None:
        try:
            engine.set_result(LLMEngine(config))
        except BaseException as error:  # the engine thread raises it, and the server exits
            engine.set_exception(error)

    threading.Thread(target=load, name="pagoda-load", daemon=True).start()
    return lambda _: engine.result()


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
    if args.command == "router":
        from pagoda.router.main import run

        return run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
