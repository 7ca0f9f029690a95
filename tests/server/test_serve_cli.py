"""`pagoda serve` argument parsing: vLLM's flag names, PAGODA_* environment defaults, --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagoda.cli import build_parser, memory_size

CONTRACT_FLAGS = [
    "--host",
    "--port",
    "--served-model-name",
    "--max-model-len",
    "--block-size",
    "--gpu-memory-utilization",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--tensor-parallel-size",
    "--dtype",
    "--quantization",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--api-key",
    "--seed",
    "--shutdown-timeout",
    "--kv-cache-memory",
    "--max-queue-len",
]


def parse(argv: list[str], environ: dict[str, str] | None = None):
    return build_parser(environ or {}).parse_args(["serve", *argv])


def test_defaults_match_vllm() -> None:
    args = parse([])
    assert args.model is None and args.host == "0.0.0.0" and args.port == 8000
    assert args.block_size == 16 and args.max_num_seqs == 256 and args.gpu_memory_utilization == 0.9
    assert args.enable_prefix_caching is True and args.api_key is None and args.max_queue_len is None


def test_every_contract_flag_is_accepted() -> None:
    args = parse(
        [
            "model.gguf",
            "--host",
            "127.0.0.1",
            "--port",
            "9000",
            "--served-model-name",
            "a",
            "b",
            "--max-model-len",
            "512",
            "--block-size",
            "32",
            "--gpu-memory-utilization",
            "0.5",
            "--max-num-seqs",
            "4",
            "--max-num-batched-tokens",
            "128",
            "--tensor-parallel-size",
            "2",
            "--dtype",
            "bfloat16",
            "--quantization",
            "gguf",
            "--no-enable-prefix-caching",
            "--api-key",
            "k",
            "--seed",
            "7",
            "--shutdown-timeout",
            "2.5",
            "--kv-cache-memory",
            "512MiB",
            "--max-queue-len",
            "3",
        ]
    )
    assert args.model == "model.gguf" and args.port == 9000 and args.served_model_name == ["a", "b"]
    assert args.max_model_len == 512 and args.block_size == 32 and args.gpu_memory_utilization == 0.5
    assert args.tensor_parallel_size == 2 and args.dtype == "bfloat16" and args.quantization == "gguf"
    assert args.enable_prefix_caching is False and args.api_key == "k" and args.seed == 7
    assert args.shutdown_timeout == 2.5 and args.kv_cache_memory == 512 * 2**20 and args.max_queue_len == 3


def test_environment_variables_are_defaults_and_the_command_line_wins() -> None:
    env = {
        "PAGODA_MAX_MODEL_LEN": "1024",
        "PAGODA_API_KEY": "secret",
        "PAGODA_ENABLE_PREFIX_CACHING": "false",
        "PAGODA_SERVED_MODEL_NAME": "x,y",
        "PAGODA_MODEL": "/models/m.gguf",
        "PAGODA_KV_CACHE_MEMORY": "1GiB",
    }
    args = parse([], env)
    assert args.max_model_len == 1024 and args.api_key == "secret" and args.enable_prefix_caching is False
    assert args.served_model_name == ["x", "y"] and args.model == "/models/m.gguf"
    assert args.kv_cache_memory == 2**30
    assert parse(["--max-model-len", "64", "--enable-prefix-caching"], env).max_model_len == 64
    assert parse(["--enable-prefix-caching"], env).enable_prefix_caching is True


@pytest.mark.parametrize(
    "environ",
    [
        {"PAGODA_DTYPE": "int3"},
        {"PAGODA_PORT": "eighty"},
        {"PAGODA_ENFORCE_EAGER": "maybe"},
        {"PAGODA_MAX_NUM_SEQS": "0"},
    ],
)
def test_bad_environment_values_are_rejected(environ: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse([], environ)
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--gpu-memory-utilization", "1.5"],
        ["--max-num-seqs", "0"],
        ["--kv-cache-memory", "lots"],
        ["--dtype", "int3"],
        ["--tool-call-parser", "pythonic"],
        ["--reasoning-parser", "nope"],
    ],
)
def test_bad_flag_values_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)


def test_auto_tool_choice_needs_a_parser() -> None:
    from pagoda.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--enable-auto-tool-choice"])
    assert exit_info.value.code == 2


def test_memory_sizes() -> None:
    assert memory_size("4GiB") == 4 * 2**30 and memory_size("2G") == 2 * 10**9 and memory_size("1024") == 1024


def test_help_explains_every_flag_and_is_fast() -> None:
    # a real subprocess: --help must not import torch (it would take seconds)
    result = subprocess.run(
        [sys.executable, "-m", "pagoda", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for flag in CONTRACT_FLAGS:
        assert flag in result.stdout, flag
    assert "PAGODA_" in result.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pagoda.cli import build_parser; "
            "build_parser({}); print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == "False"


def test_what_serve_imports_leaves_torch_compile_unloaded() -> None:
    """`pagoda serve` imports the engine and the API server before it loads the model; torch.compile's
    machinery (torch._dynamo, torch._inductor: ~3 s on these machines) must not come with them, so cold
    start stays within its budget. A dependency that compiles at import time (llguidance.torch did) fails
    this."""
    code = (
        "import sys, pagoda.cli, pagoda.engine.llm_engine, pagoda.entrypoints.api_server\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_serve_imports_and_the_gguf_config_leave_transformers_unloaded() -> None:
    """Importing transformers and its config classes costs `pagoda serve` ~3 s of its cold start: serve's
    imports, opening the embedded GGUF, its config, model and weights must do without (only the tokenizer,
    built on a thread of its own while the weights load, still wraps itself in transformers' class)."""
    code = (
        "import sys, pagoda.cli, pagoda.engine.llm_engine, pagoda.entrypoints.api_server\n"
        "from pagoda.loader import open_checkpoint\n"
        "from pagoda.models.registry import build_model\n"
        "import torch\n"
        "checkpoint = open_checkpoint(None)\n"
        "model = build_model(checkpoint.config, torch.float32, torch.device('cpu'))\n"
        "next(checkpoint.quantized_weights())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')[:3])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
