"""Quantization: each format's product against F.linear with its dequantized weight, the GGUF block
decoding against gguf-py's reference dequantizer, the Triton dequant-matmul under TRITON_INTERPRET=1,
int8 / fp8-KV engines against full precision on a tiny model, and perplexity on the embedded model.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize as reference_quantize
from interpreted_triton import interpreted
from tiny_models import make_tiny_model

from pagoda import LLM, SamplingParams
from pagoda.config import EngineConfig
from pagoda.layers.linear import Linear, MergedLinear
from pagoda.loader.checkpoint import QuantizedBlocks
from pagoda.quantization import cpu_kernels, process_weights_after_loading, quantized_layers
from pagoda.quantization.cpu_kernels import DENSE_MIN_ROWS, CpuQuantizedWeight
from pagoda.quantization.gguf_blocks import group_quantized_from_blocks
from pagoda.quantization.grouped import GroupQuantized, quantize_int8

Q = GGMLQuantizationType
QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # gguf-py can quantize these
BLOCK_ONLY = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # these it can only dequantize: random blocks, sane scales
K_SCALE_FIELDS = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def gguf_weight(ggml_type: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> QuantizedBlocks:
    rng = np.random.default_rng(seed)
    if ggml_type in QUANTIZABLE:
        blocks = reference_quantize(rng.standard_normal((rows, cols)).astype(np.float32), ggml_type)
    else:
        _, block_bytes = GGML_QUANT_SIZES[ggml_type]
        blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
        for start in K_SCALE_FIELDS[ggml_type]:
            scales = rng.uniform(0.001, 0.02, size=(len(blocks), 1)).astype(np.float16)
            blocks[:, start : start + 2] = scales.view(np.uint8)
    return QuantizedBlocks(
        torch.from_numpy(np.ascontiguousarray(blocks).reshape(rows, -1)), int(ggml_type), (rows, cols)
    )


def reference_weight(weight: QuantizedBlocks) -> torch.Tensor:
    values = reference_dequantize(weight.data.numpy(), GGMLQuantizationType(weight.ggml_type))
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(weight.shape)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


# Torch's packed CPU kernels take bfloat16 activations and give bfloat16 products: ~2**-9 relative
# rounding per value, so the error over a whole output stays well under 1%.
CPU_KERNEL_TOLERANCE = 1e-2


@pytest.mark.parametrize("ggml_type", QUANTIZABLE + BLOCK_ONLY, ids=lambda t: t.name)
def test_gguf_blocks_decode_exactly_like_gguf_py(ggml_type: GGMLQuantizationType) -> None:
    weight = gguf_weight(ggml_type, 32, 512)
    decoded = group_quantized_from_blocks(weight)
    assert decoded.bits == (4 if ggml_type in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else 8)
    torch.testing.assert_close(decoded.dequantize(), reference_weight(weight), rtol=0, atol=0)


def test_float16_scaled_int8_is_gguf_q8_0() -> None:
    """The LM head's small-batch copy (`quantize_int8(..., float16_scales=True)`) quantizes as llama.cpp's
    Q8_0 does: gguf-py's quantizer, value for value (ties, zero groups and tiny groups included)."""
    w = torch.randn(64, 256) * torch.logspace(-6, 2, 64)[:, None]
    w[3] = 0.0  # an all-zero group
    w[5, :32] = torch.arange(32) - 15.5  # scale 1 (the 127 below): exact halves, rounded away from zero
    w[5, 0] = 127.0
    ours = quantize_int8(w, 32, float16_scales=True).dequantize(torch.float32)
    expected = reference_dequantize(reference_quantize(w.numpy(), Q.Q8_0), Q.Q8_0)
    torch.testing.assert_close(ours, torch.from_numpy(expected), rtol=0, atol=0)


@pytest.mark.parametrize("ggml_type", QUANTIZABLE + BLOCK_ONLY, ids=lambda t: t.name)
@pytest.mark.parametrize("num_tokens", [1, 5, 40])
def test_cpu_kernel_matches_dequantized_reference(ggml_type: GGMLQuantizationType, num_tokens: int) -> None:
    weight = gguf_weight(ggml_type, 64, 512)
    x = torch.randn(num_tokens, 512)
    out = CpuQuantizedWeight(group_quantized_from_blocks(weight)).matmul(x)
    assert out.dtype == x.dtype
    assert relative_error(out, F.linear(x, reference_weight(weight))) < CPU_KERNEL_TOLERANCE


@pytest.mark.parametrize("ggml_type", [Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_cpu_dense_copy_serves_steps_of_many_rows(ggml_type: GGMLQuantizationType) -> None:
    weight = gguf_weight(ggml_type, 64, 512)
    dense = CpuQuantizedWeight(group_quantized_from_blocks(weight), torch.bfloat16)
    plain = CpuQuantizedWeight(group_quantized_from_blocks(weight), torch.bfloat16)
    plain.dense = None  # the same quantized kernel (which may depend on a dense copy), without the copy
    few, many = torch.randn(DENSE_MIN_ROWS - 1, 512).bfloat16(), torch.randn(DENSE_MIN_ROWS, 512).bfloat16()
    assert torch.equal(dense.matmul(few), plain.matmul(few))  # below the threshold: the quantized kernel
    expected = F.linear(many.float(), reference_weight(weight))
    assert relative_error(dense.matmul(many), expected) < CPU_KERNEL_TOLERANCE
    assert not torch.equal(dense.matmul(many), plain.matmul(many))  # ... and above it, the dense GEMM


@pytest.mark.parametrize("ggml_type", QUANTIZABLE + BLOCK_ONLY, ids=lambda t: t.name)
def test_cpu_dense_copy_is_the_reference_weight_rounded_once(
    ggml_type: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # built a few rows at a time (a chunk here is 3 rows, not a divisor of 64): each value must still be
    # gguf-py's float32 weight, rounded to bfloat16 once
    monkeypatch.setattr(cpu_kernels, "_DENSE_CHUNK_BYTES", 3 * 4 * 512)
    weight = gguf_weight(ggml_type, 64, 512)
    dense = CpuQuantizedWeight(group_quantized_from_blocks(weight), torch.bfloat16).dense
    assert dense is not None
    assert torch.equal(dense, reference_weight(weight).bfloat16())


def test_cpu_kernel_falls_back_on_shapes_without_a_packed_kernel() -> None:
    # 24 rows: the int4 kernel wants multiples of 16; 96 inputs: the C++ one packs 4 bits in runs of 64
    weight = gguf_weight(Q.Q4_0, 24, 96)
    kernel = CpuQuantizedWeight(group_quantized_from_blocks(weight))
    assert kernel.fallback is not None
    x = torch.randn(3, 96)
    torch.testing.assert_close(kernel.matmul(x), F.linear(x, reference_weight(weight)), rtol=1e-5, atol=1e-5)


def build_linear(quantization: str | None, weight: torch.Tensor) -> Linear:
    with quantized_layers(quantization):
        layer = Linear(weight.shape[1], weight.shape[0])
    layer.weight.weight_loader(layer.weight, weight)
    process_weights_after_loading(layer)
    return layer


def test_packing_in_parallel_leaves_torch_threads_as_they_were() -> None:
    """The layers are packed by single-threaded workers; torch.set_num_threads(1) in them also sets the
    count that threads starting later begin with: the engine thread must still get the usual count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # whatever this module runs with: the workers' 1 must not stick
    try:
        check_packing_restores_threads(2)
    finally:
        torch.set_num_threads(threads)


def check_packing_restores_threads(threads: int) -> None:
    with quantized_layers("int8"):
        model = torch.nn.Sequential(*(Linear(64, 64) for _ in range(4)))
    for layer in model:
        layer.weight.weight_loader(layer.weight, torch.randn(64, 64))
    process_weights_after_loading(model)
    assert all(layer.quantized is not None for layer in model)
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [threads] and torch.get_num_threads() == threads


def test_int8_linear_matches_per_channel_reference() -> None:
    weight = torch.randn(96, 128) * torch.linspace(0.01, 3.0, 96)[:, None]  # very different row ranges
    # the W8A16 recipe, written out: a scale per output row, symmetric, round to nearest
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    dequantized = torch.round(weight / scale).clamp(-127, 127) * scale
    layer = build_linear("int8", weight)
    assert layer.weight is None  # the float weight is gone after loading
    x = torch.randn(7, 128)
    assert relative_error(layer(x), F.linear(x, dequantized)) < CPU_KERNEL_TOLERANCE
    # and the quantization error itself is what int8 promises: < 1% of the product
    assert relative_error(layer(x), F.linear(x, weight)) < 1e-2


def test_fp8_linear_matches_e4m3_reference() -> None:
    weight = torch.randn(48, 64) * torch.linspace(0.01, 3.0, 48)[:, None]
    scale = weight.abs().amax(dim=1, keepdim=True) / 448
    dequantized = (weight / scale).to(torch.float8_e4m3fn).float() * scale  # torch's own e4m3 cast
    layer = build_linear("fp8", weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), F.linear(x, dequantized), rtol=1e-4, atol=1e-4)
    assert relative_error(layer(x), F.linear(x, weight)) < 5e-2


def test_gguf_fused_projection_of_mixed_formats() -> None:
    """q/k/v in three formats (as Q4_K_M files mix them) stack into one kernel with exact weights."""
    parts = [
        gguf_weight(Q.Q4_K, 64, 256, seed=1),
        gguf_weight(Q.Q8_0, 32, 256, seed=2),
        gguf_weight(Q.Q6_K, 32, 256, seed=3),
    ]
    with quantized_layers("gguf"):
        layer = MergedLinear(256, [64, 32, 32], bias=True)
    for shard, part in enumerate(parts):
        layer.weight.weight_loader(layer.weight, part, shard)
    bias = torch.randn(128)
    layer.bias.weight_loader(layer.bias, bias)
    process_weights_after_loading(layer)
    x = torch.randn(4, 256)
    expected = F.linear(x, torch.cat([reference_weight(p) for p in parts]), bias)
    # Q6_K's groups of 16 leave the torch kernels out: this layer dequantizes on the fly, exactly
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_gguf_loader_rejects_a_wrong_shape() -> None:
    with quantized_layers("gguf"):
        layer = Linear(256, 64)
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight.weight_loader(layer.weight, gguf_weight(Q.Q8_0, 32, 256))


def test_config_validates_quantization_options() -> None:
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")


# --- engines on a tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("quant") / "llama")


PROMPTS = [[1 + (7 * i + 3 * j) % 250 for j in range(5 + 3 * i)] for i in range(6)]


def greedy_tokens(path: Path, max_tokens: int = 16, **options: object) -> list[list[int]]:
    llm = LLM(str(path), kv_cache_memory=1 << 20, max_num_seqs=8, **options)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def matched_share(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Share of reference tokens reproduced before each sequence's first differing token."""
    matched = 0
    for ref, cand in zip(reference, candidate, strict=True):
        matched += next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), len(ref))
    return matched / sum(len(r) for r in reference)


# The tiny models' wide random weights make their activations large and their greedy paths fragile: the
# same model in bfloat16 keeps only 79% of the float32 tokens before the first difference (4 tokens x 6
# prompts). int8 keeps 96%; 75% is bfloat16's level less one token, while a broken kernel (wrong scale,
# transposed weight) keeps ~0%. fp8's 3% weight error is too much for these models' greedy paths, so
# fp8 weights and the fp8 KV cache are judged by perplexity on the real model below instead.
AGREEMENT_THRESHOLD = 0.75


def test_int8_engine_keeps_the_greedy_tokens(tiny_llama: Path) -> None:
    full = greedy_tokens(tiny_llama, max_tokens=4)
    assert (
        matched_share(full, greedy_tokens(tiny_llama, max_tokens=4, quantization="int8"))
        >= AGREEMENT_THRESHOLD
    )


def test_fp8_kv_cache_holds_four_times_the_float32_tokens(tiny_llama: Path) -> None:
    # the model runs in float32 on the CPU: 4 bytes per K/V value become 1 (on a GPU, bfloat16: twice)
    full = LLM(str(tiny_llama), kv_cache_memory=1 << 20).engine
    fp8 = LLM(str(tiny_llama), kv_cache_memory=1 << 20, kv_cache_dtype="fp8").engine
    assert fp8.kv_cache_tokens == 4 * full.kv_cache_tokens
    assert fp8.runner.attention_layers[0].k_cache.dtype == torch.float8_e4m3fn


# --- perplexity on the embedded model ----------------------------------------------------------------


def perplexity(llm: LLM, token_ids: list[int], window: int = 128) -> float:
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids) - 1, window)]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    scored = [
        entry[token]
        for ids, out in zip(windows, outputs)
        for token, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True)
    ]
    return math.exp(-sum(scored) / len(scored))


@pytest.fixture(scope="module")
def embedded_perplexities() -> dict[str, float]:
    """Perplexity of 256 tokens of held-out prose (the Python reference's "Execution model" chapter,
    shipped in the stdlib) under each format; the float expansion of the Q4_1 file is "full"."""
    full = {"quantization": "none", "dtype": "float32"}
    formats = {
        "full": full,
        "int8": {**full, "quantization": "int8"},
        "fp8": {**full, "quantization": "fp8"},
        "gguf": {**full, "quantization": "gguf"},
        "kv-fp8": {**full, "kv_cache_dtype": "fp8"},
        # what LLM() runs: the file's blocks, bfloat16 activations where the CPU has them, and (a small
        # file) dense copies of the weights, which the prompt's 256 rows take
        "default": {},
        "int4 only": {"dense_weights_for_batches": False},
    }
    result = {}
    token_ids: list[int] = []
    for name, options in formats.items():
        llm = LLM(kv_cache_memory=16 << 20, max_model_len=512, enable_prefix_caching=False, **options)
        token_ids = token_ids or llm.get_tokenizer().encode(topics["execmodel"])[:257]
        result[name] = perplexity(llm, token_ids)
    return result


def test_embedded_model_full_precision_perplexity_is_sane(embedded_perplexities: dict[str, float]) -> None:
    # measured 21.6 on 512 tokens (docs/quantization.md); a broken model scores in the hundreds
    assert 5 < embedded_perplexities["full"] < 40


@pytest.mark.parametrize(
    ("name", "limit"),
    [("int8", 0.01), ("gguf", 0.01), ("fp8", 0.03), ("kv-fp8", 0.02), ("default", 0.01), ("int4 only", 0.01)],
)
def test_embedded_model_perplexity_regression(
    embedded_perplexities: dict[str, float], name: str, limit: float
) -> None:
    """int8 within 1% (the issue's target); GGUF multiplies the file's own Q4_1 weights, so it must match
    their float expansion within 1% too; fp8 weights within 3% and the fp8 KV cache within 2% (measured:
    +1.6% and +0.4% on 1024 tokens, docs/quantization.md). The default (GGUF blocks, bfloat16 activations
    on a CPU with native bfloat16, dense weight copies for many rows) within 1% as well, and so without
    the dense copies."""
    assert embedded_perplexities[name] / embedded_perplexities["full"] - 1 < limit


# --- Triton dequant-matmul under the interpreter -----------------------------------------------------


@pytest.fixture(scope="module")
def tk() -> Iterator[ModuleType]:
    with interpreted("pagoda.quantization.triton_kernels") as module:
        yield module


@pytest.mark.parametrize("ggml_type", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_triton_dequant_matmul_matches_reference(tk: ModuleType, ggml_type: GGMLQuantizationType) -> None:
    # 80 rows and 3 tokens: partial tiles on both sides of the output
    weight = gguf_weight(ggml_type, 80, 256)
    x = torch.randn(3, 256)
    out = tk.TritonQuantizedWeight(group_quantized_from_blocks(weight)).matmul(x)
    torch.testing.assert_close(out, F.linear(x, reference_weight(weight)), rtol=1e-4, atol=1e-4)


def test_triton_per_channel_int8_matches_reference(tk: ModuleType) -> None:
    q = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    scale = torch.rand(40, 1) * 0.1
    x = torch.randn(17, 96)  # K = 96: a partial K tile too
    out = tk.TritonQuantizedWeight(GroupQuantized(q, scale, None, bits=8)).matmul(x)
    torch.testing.assert_close(out, F.linear(x, q.float() * scale), rtol=1e-4, atol=1e-4)
