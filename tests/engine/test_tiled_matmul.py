"""The tiled 4- and 8-bit matmul (pagoda/csrc/tiled_matmul.cpp) against F.linear in float64 with the
weight gguf-py dequantizes (or `GroupQuantized.dequantize` gives), and the engine's choice of it.

`make install` builds the kernel for this machine: its AVX-512 VNNI code, or its AVX2 one (an x86-64-v3
image's); a build with neither (another CPU) has no kernel to test, and the engine does not use it there.
On an AVX-512 VNNI machine the last test runs these tests again against an x86-64-v3 build, in a process
that loads it instead (`PAGODA_TEST_CPU_LIBRARY`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize as reference_quantize
from other_build import rerun_under_x86_64_v3, use_requested_build

from pagoda import cpu_extension
from pagoda.loader.checkpoint import QuantizedBlocks
from pagoda.quantization import cpu_kernels
from pagoda.quantization.cpu_kernels import CpuQuantizedWeight, TiledWeight, kernel_for, tiled_kernel_fits
from pagoda.quantization.gguf_blocks import group_quantized_from_blocks
from pagoda.quantization.grouped import GroupQuantized

OTHER_BUILD = use_requested_build()  # this process runs the x86-64-v3 build's code (other_build.py)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_extension.available(), "the C++ CPU kernels are not built: python -m pagoda.cpu_extension"
    if OTHER_BUILD:
        assert torch.ops.pagoda.tiled_matmul_isa() == "avx2", "the x86-64-v3 build has its AVX2 kernel"
    if not cpu_kernels.tiled_kernel_built():
        pytest.skip("this build has neither AVX-512 VNNI nor AVX2: the engine keeps its other kernels")


def gguf_weight(ggml_type: Q, n: int, k: int, seed: int = 0) -> tuple[GroupQuantized, torch.Tensor]:
    """A real GGUF weight (gguf-py's quantizer) and gguf-py's own dequantized float32 values."""
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    blocks = reference_quantize(values, ggml_type)
    data = torch.from_numpy(np.ascontiguousarray(blocks).reshape(n, -1))
    weight = QuantizedBlocks(data, int(ggml_type), (n, k))
    expected = reference_dequantize(blocks, ggml_type).reshape(n, k)
    return group_quantized_from_blocks(weight), torch.from_numpy(np.asarray(expected, dtype=np.float32))


def random_weight(n: int, k: int, group: int, offsets: bool, seed: int = 0, bits: int = 4) -> GroupQuantized:
    gen = torch.Generator().manual_seed(seed)
    low, high = (0, 16) if bits == 4 else (-128, 128)
    q = torch.randint(low, high, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=gen) * 0.05 + 1e-3).half().float()  # float16, as in GGUF
    offset = (torch.randn(n, k // group, generator=gen) * 0.1).half().float() if offsets else None
    return GroupQuantized(q, scale, offset, bits)


def assert_within_bound(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, group: int) -> None:
    """out against x @ w.T in float64. The kernel's only approximation: each activation in 14-bit fixed
    point per group, off by at most 2^-14 of the group's largest magnitude; then float32 sums and the
    output's own rounding (half an ulp of its dtype)."""
    x64, w64 = x.double(), w.double()
    expected = F.linear(x64, w64)
    m, k = x.shape
    group_max = x64.abs().view(m, k // group, group).amax(dim=2)  # [M, G]
    weight_mass = w64.abs().view(w.shape[0], k // group, group).sum(dim=2)  # [N, G]
    bound = (
        2.0**-14 * group_max @ weight_mass.T
        + 1e-5 * x64.abs() @ w64.abs().T
        + torch.finfo(out.dtype).eps / 2 * expected.abs()
    )
    assert out.dtype == x.dtype
    error = (out.double() - expected).abs()
    assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize("ggml_type", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_weights_match_gguf_py(ggml_type: Q, dtype: torch.dtype) -> None:
    weight, expected = gguf_weight(ggml_type, 48, 576)  # 3 tiles; 18 groups
    assert kernel_for(weight) == "tiled"
    packed = TiledWeight(weight)
    for rows in (1, 2, 5, 8, 9, 17):  # blocks of 8 activation rows and their remainders
        # activations over 3 decades, so groups hold values the fixed point rounds
        x = (torch.randn(rows, 576) * torch.logspace(-2, 1, 576)).to(dtype)
        assert_within_bound(packed.matmul(x), x, expected, 32)


@pytest.mark.parametrize(("n", "k", "group"), [(16, 64, 32), (48, 128, 64), (80, 192, 32)])
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_matches_the_dequantized_reference(n: int, k: int, group: int, offsets: bool, bits: int) -> None:
    weight = random_weight(n, k, group, offsets, bits=bits)
    packed = TiledWeight(weight)
    for rows in range(1, 12):
        x = torch.randn(rows, k)
        assert_within_bound(packed.matmul(x), x, weight.dequantize(), group)
    strided = torch.randn(3, 2 * k)[:, ::2]
    assert_within_bound(packed.matmul(strided), strided, weight.dequantize(), group)


@pytest.mark.parametrize("bits", [4, 8])
def test_threads_split_tiles_without_changing_a_bit(bits: int) -> None:
    packed = TiledWeight(random_weight(160, 256, 32, True, bits=bits))
    x = torch.randn(5, 256).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = packed.matmul(x)
        torch.set_num_threads(2)
        assert torch.equal(packed.matmul(x), alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_non_finite_activation_gives_nan_in_its_row_only(bits: int) -> None:
    packed = TiledWeight(random_weight(32, 128, 32, False, bits=bits))  # (an offset would carry the NaN)
    x = torch.randn(3, 128).bfloat16()
    x[0, 5], x[2, 100] = float("nan"), float("inf")
    out = packed.matmul(x)
    assert out[0].isnan().all() and out[2].isnan().all()
    assert torch.equal(out[1], packed.matmul(x[1:2])[0])  # the finite row as it is alone


def test_fits_only_what_it_computes() -> None:
    assert tiled_kernel_fits(random_weight(32, 64, 32, True))
    assert not tiled_kernel_fits(random_weight(40, 64, 32, True))  # not whole tiles of 16 rows
    assert not tiled_kernel_fits(random_weight(32, 256, 128, True))  # groups beyond 64: sums past 2^24
    per_row = GroupQuantized(torch.zeros(32, 256, dtype=torch.int8), torch.ones(32, 1), None, 8)
    assert not tiled_kernel_fits(per_row)  # one group of 256 (and torch's int8 kernel takes it)
    inexact = random_weight(32, 64, 32, False)
    inexact.scale[0, 0] = 1 / 3  # not a float16: the layout's scales would round it
    assert not tiled_kernel_fits(inexact)
    assert kernel_for(inexact) != "tiled"


def test_rejects_what_it_cannot_compute() -> None:
    packed = TiledWeight(random_weight(16, 64, 32, True))
    op = torch.ops.pagoda.tiled_matmul
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(x.double(), packed.w, 4, 32, True)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        op(x, packed.w, 5, 32, True)
    with pytest.raises(RuntimeError, match="groups must be of 32 or 64"):
        op(x, packed.w, 4, 16, True)
    with pytest.raises(RuntimeError, match="do not hold"):
        op(x, packed.w, 4, 32, False)  # tiles with offsets read as tiles without
    with pytest.raises(RuntimeError, match="do not hold"):
        op(x, packed.w, 8, 32, True)  # 4-bit tiles read as 8-bit ones
    with pytest.raises(RuntimeError, match="do not hold"):
        op(torch.randn(2, 128), packed.w, 4, 32, True)


def test_cpu_quantized_weight_keeps_one_layout() -> None:
    weight, expected = gguf_weight(Q.Q4_1, 32, 128)
    packed = CpuQuantizedWeight(weight, torch.bfloat16)
    assert packed.tiled is not None and not packed.int4_terms and packed.grouped is None
    assert packed.tensors() == [packed.tiled.w, packed.dense]
    x = torch.randn(3, 128)
    assert_within_bound(packed.matmul(x), x, expected, 32)


def test_the_x86_64_v3_build_passes_these_tests_too() -> None:
    """The AVX2 code, as an x86-64-v3 image builds it, on a machine whose own build runs the AVX-512 one."""
    if OTHER_BUILD or torch.ops.pagoda.tiled_matmul_isa() != "avx512vnni":
        pytest.skip("the tests above ran this build's AVX2 code")
    rerun_under_x86_64_v3(__file__)
