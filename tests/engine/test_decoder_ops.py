"""The C++ decoder-layer ops (pagoda/csrc/decoder_ops.cpp: residual add + RMSNorm, SiLU-and-mul, RoPE)
against transformers' modules and torch's own ops, bit for bit, on odd shapes too: the decode step swaps them
in on the CPU and must compute the very same floats.

`make install` builds the library; a checkout without the build fails here rather than skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_layers import norms_with_one_weight
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from pagoda.layers import cpu_ops
from pagoda.layers.activation import GatedActivation
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RopeConfig, RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_ops.available(), "the C++ CPU operators are not built: python -m pagoda.cpu_extension"


def assert_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    diff = (got.float() - expected.float()).abs().max().item()
    assert torch.equal(got, expected), f"{what}: {(got != expected).sum().item()} differ, max diff {diff}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 576), (9, 576), (3, 5), (2, 17), (4, 1000), (2, 4096), (70, 96)])
def test_add_rms_norm_matches_transformers(
    dtype: torch.dtype, unit_offset: bool, shape: tuple[int, int]
) -> None:
    # rows up to 4096 wide take torch's cascaded sum past its first level; 70 rows spread over threads
    gen = torch.Generator().manual_seed(shape[0] * shape[1] + unit_offset)
    reference, ours = norms_with_one_weight(shape[-1], dtype, unit_offset, gen)
    for scale in (1e-2, 1.0, 30.0):
        x = (torch.randn(shape, generator=gen) * scale).to(dtype)
        residual = (torch.randn(shape, generator=gen) * scale).to(dtype)
        out, total = ours(x, residual)
        assert_equal(total, residual + x, f"sum, scale {scale}")
        assert_equal(out, reference(residual + x), f"norm of the sum, scale {scale}")
        assert_equal(ours(x), reference(x), f"norm, scale {scale}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(1, 576), (3, 5), (2, 4096), (70, 96)])
def test_add_norm_in_place_matches_transformers(dtype: torch.dtype, unit_offset: bool, shape) -> None:
    # the decoder's residual stream: x becomes the norm of the sum, the residual the sum, no new tensors
    gen = torch.Generator().manual_seed(shape[0] + shape[1] + unit_offset)
    reference, ours = norms_with_one_weight(shape[-1], dtype, unit_offset, gen)
    for scale in (1e-2, 1.0, 30.0):
        x = (torch.randn(shape, generator=gen) * scale).to(dtype)
        residual = (torch.randn(shape, generator=gen) * scale).to(dtype)
        total = residual + x
        out, summed = ours.add_norm_(x, residual)
        assert out is x and summed is residual
        assert_equal(summed, total, f"sum, scale {scale}")
        assert_equal(out, reference(total), f"norm of the sum, scale {scale}")


def test_add_rms_norm_reads_strided_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=gen))
    wide = torch.randn(6, 192, generator=gen).to(torch.bfloat16)
    x, residual = wide[:, :64], wide[:, 128:]
    out, total = norm(x, residual)
    reference = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
    assert_equal(total, residual + x, "sum")
    assert_equal(out, reference(residual + x), "norm")


@pytest.mark.parametrize("rows", [1, 8, 21, 32, 512])
@pytest.mark.parametrize("width", [1536, 1000, 33, 7])
def test_silu_and_mul_matches_torch(rows: int, width: int) -> None:
    # torch's silu takes two different exps (its vector loop's, and std::exp past the last whole vectors,
    # which move where it splits a large tensor between threads): 512 rows split, 7 is all tail
    gen = torch.Generator().manual_seed(rows * width)
    act = GatedActivation("silu")
    for scale in (1.0, 10.0):
        x = (torch.randn(rows, 2 * width, generator=gen) * scale).to(torch.bfloat16)
        gate, up = x.chunk(2, dim=-1)
        assert_equal(act(x), F.silu(gate) * up, f"scale {scale}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "heads", "head_dim", "rotary_dim"),
    [(1, 12, 64, 64), (9, 12, 64, 64), (5, 4, 128, 64), (3, 2, 6, 6), (40, 3, 32, 32)],
    ids=["one", "decode", "partial", "tiny", "prefill"],
)
def test_rotary_in_place_matches_transformers(
    dtype: torch.dtype, tokens: int, heads: int, head_dim: int, rotary_dim: int
) -> None:
    gen = torch.Generator().manual_seed(tokens * heads + head_dim)
    rope = RotaryEmbedding(RopeConfig(theta=10000.0, rotary_dim=rotary_dim))
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    # q and k heads side by side in a QKV projection's output, v after them
    qkv = torch.randn(tokens, (heads + 2) * head_dim, generator=gen).to(dtype)
    qk = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    # transformers' rotation: cos/sin of the float32 angles, cast to the activations' dtype
    angles = positions.float()[:, None] * rope.inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    rot, rest = qk[..., :rotary_dim], qk[..., rotary_dim:]
    expected, _ = apply_rotary_pos_emb(rot.clone(), rot.clone(), cos, sin, unsqueeze_dim=1)
    expected = torch.cat((expected, rest), dim=-1)
    v = qkv[:, heads * head_dim :].clone()
    assert rope.rotate_(positions, qk).data_ptr() == qkv.data_ptr()  # in place
    assert_equal(qk, expected, "rotated heads")
    assert torch.equal(qkv[:, heads * head_dim :], v)  # v untouched


# torch's kernels under another capability (a host without AVX-512, or none): other vector widths, other exps
CAPABILITY_CHECK = """
import torch, torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from pagoda.layers import cpu_ops
from pagoda.layers.norm import RMSNorm
assert cpu_ops.available()
gen = torch.Generator().manual_seed(0)
for rows, width in [(1, 1536), (3, 100), (512, 1536), (2, 17), (4, 1000)]:
    x = torch.randn(rows, 2 * width, generator=gen).to(torch.bfloat16) * 4
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(torch.ops.pagoda.silu_and_mul(x), F.silu(gate) * up), ("silu", rows, width)
    for dtype in (torch.float32, torch.bfloat16):
        ours, reference = RMSNorm(2 * width, 1e-6).to(dtype), LlamaRMSNorm(2 * width, 1e-6).to(dtype)
        with torch.no_grad():
            ours.weight.copy_(reference.weight.uniform_(-0.5, 1.5, generator=gen))
        assert torch.equal(ours(x.to(dtype)), reference(x.to(dtype))), ("norm", dtype, rows, width)
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_ops_follow_torchs_capability(capability: str) -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", CAPABILITY_CHECK], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == capability.upper()
