"""What the engine picks when the user leaves dtype, quantization and the KV pool to it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import make_tiny_model

from pagoda import LLM
from pagoda.engine import precision
from pagoda.engine.precision import resolve_dense_copy, resolve_dtype, resolve_quantization
from pagoda.quantization import cpu_kernels

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def checkpoint(dtype: torch.dtype, block_quantized: bool = False) -> SimpleNamespace:
    return SimpleNamespace(torch_dtype=dtype, is_block_quantized=block_quantized)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_dtype(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: native_bf16)
    half = torch.bfloat16 if native_bf16 else torch.float32
    # float32 checkpoints stay float32 on the CPU: exactly transformers' numbers
    assert resolve_dtype("auto", checkpoint(torch.float32), CPU) == torch.float32
    assert resolve_dtype("auto", checkpoint(torch.bfloat16), CPU) == half
    assert resolve_dtype("auto", checkpoint(torch.float32, block_quantized=True), CPU) == half
    assert resolve_dtype("auto", checkpoint(torch.float16), CPU) == half  # CPUs have no fast float16
    assert resolve_dtype("auto", checkpoint(torch.float32), GPU) == torch.bfloat16
    assert resolve_dtype("auto", checkpoint(torch.float16), GPU) == torch.float16
    assert resolve_dtype("float32", checkpoint(torch.bfloat16), CPU) == torch.float32


def test_auto_quantization_serves_gguf_blocks_as_they_are() -> None:
    gguf, hf = checkpoint(torch.float32, block_quantized=True), checkpoint(torch.bfloat16)
    assert resolve_quantization(None, gguf, tensor_parallel_size=1) == "gguf"
    assert resolve_quantization(None, gguf, tensor_parallel_size=2) is None  # no TP in the GGUF kernels
    assert resolve_quantization("none", gguf, tensor_parallel_size=1) is None
    assert resolve_quantization(None, hf, tensor_parallel_size=1) is None
    assert resolve_quantization("int8", hf, tensor_parallel_size=1) == "int8"


def test_dense_weight_copies_by_default_only_for_small_files_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the embedded model (~100 MB) keeps them: LLM()'s prefill takes the dense GEMM
    llm = LLM(kv_cache_memory=16 << 20, max_model_len=256)
    projection = llm.engine.runner.model.model.layers[0].mlp.down_proj.quantized
    assert projection.dense is not None and projection.dense.dtype == llm.engine.runner.dtype
    small, large = tmp_path / "small.gguf", tmp_path / "large.gguf"
    small.write_bytes(b"\0" * 1000)
    large.write_bytes(b"\0" * 1001)
    monkeypatch.setattr(precision, "DENSE_COPY_MAX_FILE_BYTES", 1000)
    assert resolve_dense_copy(None, SimpleNamespace(path=small), CPU)
    assert not resolve_dense_copy(None, SimpleNamespace(path=large), CPU)  # its memory serves the KV cache
    assert not resolve_dense_copy(None, SimpleNamespace(path=tmp_path), CPU)  # a directory: no GGUF blocks
    assert resolve_dense_copy(True, SimpleNamespace(path=large), CPU)  # the option decides when given
    assert not resolve_dense_copy(False, SimpleNamespace(path=small), CPU)
    assert not resolve_dense_copy(True, SimpleNamespace(path=small), GPU)  # GPUs run their own kernels


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_a_large_cpu_kv_pool_costs_memory_only_as_it_fills(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tmp_path / "llama")
    before = rss_bytes()
    llm = LLM(model=str(model), kv_cache_memory=2 << 30, max_model_len=64, max_num_seqs=100_000)
    runner = llm.engine.runner
    assert runner.num_blocks * runner.block_bytes > (2 << 30) * 0.9  # the whole budget was allocated
    assert rss_bytes() - before < 256 << 20  # ... but not touched
    # untouched pages read as zeros: masked padding in a block must never be NaN garbage
    assert not runner.attention_layers[0].k_cache[-1].any()


def test_a_quantized_model_scores_few_rows_with_an_8bit_head(tmp_path: Path) -> None:
    head = LLM(max_model_len=128, kv_cache_memory=16 << 20).engine.runner.model.lm_head  # embedded GGUF
    assert head.small_batch_weight is not None
    # Q8_0's float16 scales: the tiled int8 kernel serves it where the library has it
    assert (head.small_batch_weight.tiled is not None) == cpu_kernels.tiled_kernel_built()
    hidden = torch.randn(3, head.weight.shape[1]).to(head.weight.dtype)
    exact = torch.nn.functional.linear(hidden.float(), head.weight.float())
    approx = head(hidden).float()
    assert float((approx - exact).norm() / exact.norm()) < 0.01  # 8-bit groups of 32, bfloat16 products
    wide = hidden.repeat(4, 1)  # past a few rows: the float head, exactly
    assert torch.equal(head(wide), torch.nn.functional.linear(wide, head.weight))
    # a float checkpoint keeps its float head whatever the batch
    tiny = LLM(model=str(make_tiny_model("llama", tmp_path / "llama")), max_model_len=64)
    assert tiny.engine.runner.model.lm_head.small_batch_weight is None
