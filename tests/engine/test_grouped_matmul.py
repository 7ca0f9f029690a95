"""The C++ grouped-quantized matmul (pagoda/csrc/grouped_matmul.cpp) against F.linear with the dequantized
weight in float64, and the engine on a GGUF checkpoint through it against the torch kernels.

`make install` builds the kernel; a checkout without the build fails here rather than skipping.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagoda import cpu_extension
from pagoda.quantization import cpu_kernels
from pagoda.quantization.cpu_kernels import CpuQuantizedWeight, GroupedWeight
from pagoda.quantization.grouped import GroupQuantized


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_extension.available(), "the C++ CPU kernels are not built: python -m pagoda.cpu_extension"


def random_weight(n: int, k: int, group: int, bits: int, offsets: bool, seed: int = 0) -> GroupQuantized:
    gen = torch.Generator().manual_seed(seed)
    low, high = (-128, 128) if bits == 8 else (0, 16)
    q = torch.randint(low, high, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=gen) * 0.05 + 1e-3
    offset = torch.randn(n, k // group, generator=gen) * 0.1 if offsets else None
    return GroupQuantized(q, scale, offset, bits)


def reference(x: torch.Tensor, weight: GroupQuantized) -> torch.Tensor:
    """x @ w.T in float64, with the float32 weight `dequantize` gives (what the kernel must reproduce)."""
    return F.linear(x.double(), weight.dequantize().double())


def assert_within_rounding(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    # the output's own rounding (half an ulp of bfloat16 or float32) plus float32 sums of a few hundred
    # products: a bound on the relative error per value, against the sum of the products' magnitudes
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype
    error = (out.double() - expected).abs()
    assert (error <= eps * expected.abs() + 1e-4 * expected.abs().max()).all(), error.max()


# groups of 32 (GGUF's Q8_0 / Q4_x), 16 (Q6_K, 8 bits) and 64; N never a multiple of a tile's rows
SHAPES = [(8, 37, 96, 32), (8, 53, 80, 16), (4, 29, 192, 32), (4, 45, 128, 64)]


@pytest.mark.parametrize(("bits", "n", "k", "group"), SHAPES)
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_dequantized_reference(bits, n, k, group, offsets, dtype):
    weight = random_weight(n, k, group, bits, offsets)
    packed = GroupedWeight(weight)
    for rows in range(1, 16):
        x = torch.randn(rows, k).to(dtype)
        assert_within_rounding(packed.matmul(x), reference(x, weight), dtype)


def test_strided_activations():
    weight = random_weight(21, 128, 32, 4, True)
    x = torch.randn(5, 256)[:, ::2]  # every other column: not contiguous
    assert_within_rounding(GroupedWeight(weight).matmul(x), reference(x, weight), torch.float32)


def test_rejects_what_it_cannot_compute():
    weight = GroupedWeight(random_weight(16, 64, 32, 4, True))
    op = torch.ops.pagoda.grouped_matmul
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="x has 32 inputs, the weight 64"):
        op(x[:, :32], weight.q, weight.scale, weight.offset, 4)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(x.double(), weight.q, weight.scale, weight.offset, 4)
    with pytest.raises(RuntimeError, match="int8 for 8 bits"):
        op(x, weight.q, weight.scale, weight.offset, 8)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        op(x, weight.q, weight.scale, weight.offset, 5)
    with pytest.raises(RuntimeError, match="offset must be"):
        op(x, weight.q, weight.scale, weight.offset[:, :1], 4)
    with pytest.raises(RuntimeError, match="do not tile"):
        op(x, weight.q, weight.scale[:5], weight.offset, 4)
    # groups of 16 cannot be packed two halves to a 32-byte run
    with pytest.raises(RuntimeError, match="4-bit weights need groups"):
        op(x, weight.q, torch.rand(16, 4), None, 4)
    with pytest.raises(RuntimeError, match="8-bit groups must be multiples of 16"):
        op(torch.randn(2, 24), torch.zeros(3, 24, dtype=torch.int8), torch.rand(3, 3), None, 8)


def test_cpu_quantized_weight_takes_the_kernel_below_the_dense_rows():
    weight = random_weight(40, 128, 32, 8, False)
    packed = CpuQuantizedWeight(weight, torch.bfloat16)
    assert packed.grouped is not None and not packed.int4_terms  # one layout, not two
    x = torch.randn(3, 128)
    assert_within_rounding(packed.matmul(x), reference(x, weight), torch.float32)


def embedded_greedy_tokens() -> list[list[int]]:
    from pagoda import LLM, SamplingParams

    # float32: the kernel's products are then the dequantized weight's own, in the same precision; no
    # dense copies, so the prompts' rows go through the quantized kernels too
    llm = LLM(dtype="float32", kv_cache_memory=16 << 20, max_model_len=256, dense_weights_for_batches=False)
    tokenizer = llm.get_tokenizer()
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    requests = [{"prompt_token_ids": tokenizer.encode(p)} for p in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_embedded_gguf_decodes_through_the_kernel_as_through_dequantized_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The embedded SmolLM2 file (Q4_1 layers, Q8_0 embedding as the 8-bit head) with every quantized
    weight on the C++ kernel, against the same engine multiplying float32 dequantized weights."""
    calls: list[int] = []
    matmul = GroupedWeight.matmul

    def counted(self: GroupedWeight, x: torch.Tensor) -> torch.Tensor:
        calls.append(self.bits)
        return matmul(self, x)

    monkeypatch.setattr(GroupedWeight, "matmul", counted)
    monkeypatch.setattr(cpu_kernels, "tiled_kernel_fits", lambda weight: False)  # 4-bit ones would take it
    fits = cpu_kernels.grouped_kernel_fits
    monkeypatch.setattr(cpu_kernels, "prefers_grouped_kernel", fits)
    got = embedded_greedy_tokens()
    assert set(calls) == {4, 8}  # the layers and the head
    monkeypatch.setattr(cpu_kernels, "prefers_grouped_kernel", lambda weight: False)
    monkeypatch.setattr(cpu_kernels, "_int4_kernel_fits", lambda weight: False)  # F.linear, dequantized
    assert embedded_greedy_tokens() == got
