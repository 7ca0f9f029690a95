"""The one-launch Triton kernels for RMSNorm, RoPE and SiLU-and-mul under TRITON_INTERPRET=1 (CPU),
bit for bit against the torch code they replace on CUDA (the layers' CPU path is that torch code).

The fixture runs a private, interpreted copy of pagoda.layers.triton_ops (see interpreted_triton.py).
Two cannot be matched bit for bit here, and are held to a few units in the last place: RMSNorm on
random inputs (its mean of squares sums in another order; exact on inputs whose squares sum exactly) and
float32/float16 SiLU (torch's CPU exp is not numpy's, which the interpreter uses for libdevice's expf).
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from pagoda.attention import torch_backend
from pagoda.layers.activation import GatedActivation
from pagoda.layers.norm import RMSNorm
from pagoda.layers.rotary import RopeConfig, RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ops() -> Iterator[ModuleType]:
    from interpreted_triton import interpreted

    with interpreted("pagoda.layers.triton_ops") as module:
        yield module


def assert_nearly_equal(got: torch.Tensor, want: torch.Tensor, ulps: int, max_mismatch: float) -> None:
    """At most `ulps` units in the last place apart, and at most a max_mismatch share not equal."""
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = torch.finfo(want.dtype).eps
    assert ((got.double() - want.double()).abs() <= want.double().abs() * eps * ulps).all()
    assert (got != want).double().mean().item() <= max_mismatch


def norm_layer(dim: int, dtype: torch.dtype, unit_offset: bool, seed: int) -> RMSNorm:
    layer = RMSNorm(dim, 1e-6, unit_offset)
    layer.weight.data = torch.randn(dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return layer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize(("rows", "dim"), [(1, 4096), (7, 896), (13, 576)])
def test_rms_norm_equals_the_torch_layer(ops, dtype, unit_offset, rows, dim):
    layer = norm_layer(dim, dtype, unit_offset, seed=rows)
    gen = torch.Generator().manual_seed(dim)
    # multiples of 1/8 below 4: squares and their sums are exact in float32, in any summation order
    x = (torch.randint(-32, 33, (rows, dim), generator=gen) / 8).to(dtype)
    want = layer(x)
    assert torch.equal(ops.rms_norm(x, layer.weight, layer.eps, unit_offset), want)
    # any values: the sum of squares may round differently (in float32 a whole row moves by an ulp or
    # two), the half-precision roundings after it mostly hide that
    x = (torch.randn(rows, dim, generator=gen) * 3).to(dtype)
    got = ops.rms_norm(x, layer.weight, layer.eps, unit_offset)
    assert_nearly_equal(got, layer(x), 4, 1.0 if dtype == torch.float32 else 0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize(("rows", "dim"), [(1, 4096), (13, 576)])
def test_add_rms_norm_equals_the_residual_add_then_the_torch_layer(ops, dtype, unit_offset, rows, dim):
    layer = norm_layer(dim, dtype, unit_offset, seed=rows)
    gen = torch.Generator().manual_seed(dim)
    # sums that round in half precision; the norm of the rounded sum is held to the ulps of the test above
    # (its mean of squares sums in its own order)
    x = (torch.randn(rows, dim, generator=gen) * 300).to(dtype)
    residual = torch.randn(rows, dim, generator=gen).to(dtype)
    summed = x + residual
    out, got_sum = ops.add_rms_norm(x, residual, layer.weight, layer.eps, unit_offset)
    assert torch.equal(got_sum, summed)
    assert_nearly_equal(out, layer(summed), 4, 1.0 if dtype == torch.float32 else 0.01)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reads_strided_heads(ops, dtype):
    # Qwen3's q_norm: each head of q, a strided view of the fused qkv projection
    tokens, heads, head_dim = 5, 3, 128
    qkv = (torch.randint(-32, 33, (tokens, (heads + 2) * head_dim)) / 8).to(dtype)
    q = qkv[:, : heads * head_dim].reshape(-1, heads, head_dim)
    assert q.stride() == ((heads + 2) * head_dim, head_dim, 1)
    layer = norm_layer(head_dim, dtype, False, seed=0)
    assert torch.equal(ops.rms_norm(q, layer.weight, layer.eps, False), layer(q))
    rows = qkv[:, :300]  # rows of a wider tensor
    layer = norm_layer(300, dtype, True, seed=1)
    assert torch.equal(ops.rms_norm(rows, layer.weight, layer.eps, True), layer(rows))


def test_rms_norm_promotes_like_torch(ops):
    # a float32 weight beside bfloat16 activations: torch's product is float32
    layer = norm_layer(576, torch.float32, False, seed=2)
    x = (torch.randint(-32, 33, (3, 576)) / 8).bfloat16()
    want = layer(x)
    assert want.dtype == torch.float32
    assert torch.equal(ops.rms_norm(x, layer.weight, layer.eps, False), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "num_heads", "num_kv_heads", "head_dim", "rotary_dim"),
    [(1, 32, 8, 128, 128), (7, 14, 2, 64, 64), (3, 9, 3, 64, 32), (5, 4, 1, 96, 96)],
    ids=["llama3-decode", "qwen2", "partial-rotary", "head-dim-96"],
)
def test_rotary_equals_the_torch_rotation(ops, dtype, tokens, num_heads, num_kv_heads, head_dim, rotary_dim):
    rope = RotaryEmbedding(RopeConfig(theta=500000.0, rotary_dim=rotary_dim, scaling="llama3", factor=8.0))
    gen = torch.Generator().manual_seed(head_dim)
    positions = torch.randint(0, 5000, (tokens,), generator=gen)
    # q and k heads as the decoder hands them over: a strided view of the fused qkv output
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    heads = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(tokens, -1, head_dim)
    want = rope(positions, heads)
    cos, signed_sin = rope.cos_sin(positions, dtype)
    rot = heads[..., :rotary_dim]
    got = ops.rotate(rot, cos, signed_sin)
    assert got is not None
    if rotary_dim < head_dim:
        got = torch.cat((got, heads[..., rotary_dim:]), dim=-1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "num_heads", "num_kv_heads", "head_dim"), [(1, 32, 8, 128), (7, 14, 2, 64), (5, 4, 1, 96)],
    ids=["llama3-decode", "qwen2-prefill", "head-dim-96"],
)
def test_rotate_and_write_kv_equals_the_rotation_then_the_cache_writes(
    ops, dtype, tokens, num_heads, num_kv_heads, head_dim
):
    rope = RotaryEmbedding(RopeConfig(theta=500000.0, rotary_dim=head_dim, scaling="llama3", factor=8.0))
    gen = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 5000, (tokens,), generator=gen)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    width = (num_heads + num_kv_heads) * head_dim
    caches = [torch.randn(6, 4, num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2)]
    caches += [cache.clone() for cache in caches]
    slots = torch.randperm(24, generator=gen)[:tokens]
    slots[0] = -1  # a padding row: written nowhere
    # the general path: the torch rotation, then the torch backend's cache writes
    want = rope(positions, qkv[:, :width].view(tokens, -1, head_dim))
    value = qkv[:, width:].view(tokens, num_kv_heads, head_dim)
    torch_backend.write_kv(want[:, num_heads:], value, caches[0], caches[1], slots)
    cos, signed_sin = rope.cos_sin(positions, dtype)
    got = ops.rotate_and_write_kv(qkv, num_heads, cos, signed_sin, caches[2], caches[3], slots)
    assert torch.equal(got, want)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    # what it does not read: another cache dtype, a qkv of the wrong width
    fused = ops.rotate_and_write_kv
    assert fused(qkv, num_heads, cos, signed_sin, caches[2].double(), caches[3], slots) is None
    assert fused(qkv[:, 1:], num_heads, cos, signed_sin, caches[2], caches[3], slots) is None


def test_rotary_declines_what_it_does_not_read(ops):
    x = torch.randn(4, 2, 64)
    cos = torch.randn(4, 1, 64)
    assert ops.rotate(x, cos, cos.half()) is None  # mixed dtypes: torch promotes
    assert ops.rotate(x.transpose(1, 2), cos, cos) is None  # last dim not contiguous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "intermediate"), [(1, 1536), (5, 896), (3, 4864)])
def test_silu_and_mul_equals_the_torch_layer(ops, dtype, rows, intermediate):
    gen = torch.Generator().manual_seed(intermediate)
    wide = (torch.randn(rows, 2 * intermediate + 40, generator=gen) * 4).to(dtype)
    for x in (wide[:, : 2 * intermediate].contiguous(), wide[:, : 2 * intermediate]):  # strided rows too
        got, want = ops.silu_and_mul(x), GatedActivation("silu")(x)
        if dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:  # torch's CPU exp is not numpy's: float32 moves by an ulp or two, float16 rarely by one
            assert_nearly_equal(got, want, 4, 0.5 if dtype == torch.float32 else 0.002)
