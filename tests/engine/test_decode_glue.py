"""The fused decode attention (pagoda/csrc/decode_glue.cpp, `Attention.rope_attention`): from the QKV
projection's output to the attention's, in one call. Against the chain of ops the general path runs (the
rotation, then the C++ kernel), bit for bit, and against transformers' rotation and SDPA; then through the
engine, token for token against transformers.

`make install` builds the library; a checkout without the build fails here rather than skipping.
"""

from __future__ import annotations

import pytest
import torch
from test_triton_attention import TOLERANCE, PagedBatch, make_batch, reference_attention
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pagoda.attention import cpu_kernels
from pagoda.attention.metadata import attention_metadata
from pagoda.layers import cpu_ops
from pagoda.layers.attention import Attention
from pagoda.layers.rotary import RopeConfig, RotaryEmbedding

DECODES = ([1, 1, 1, 1], [1, 17, 40, 120])
FEW_TOKENS = ([3, 1, 8, 2], [3, 17, 40, 9])  # speculative verification: up to MAX_QUERY_LEN new tokens


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_ops.available(), "the C++ CPU operators are not built: python -m pagoda.cpu_extension"


def step(lens, dtype, num_heads, num_kv_heads, head_dim, window=None, softcap=None):
    """A batch, the projection's output qkv [N, (H + 2 Hkv) * D] for it, the new tokens' positions, and an
    attention layer over a copy of the batch's cache."""
    batch = make_batch(
        *lens, block_size=16, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype
    )
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(batch.query.shape[0], (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(*lens, strict=True)])
    attn = Attention(num_heads, num_kv_heads, head_dim, head_dim**-0.5, window, softcap)
    attn.k_cache, attn.v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    return batch, qkv.to(dtype), positions, attn


def fused(attn: Attention, batch: PagedBatch, qkv: torch.Tensor, rotary: RotaryEmbedding, positions):
    with attention_metadata(batch.md):
        return attn.rope_attention(qkv, rotary, positions)


@pytest.mark.parametrize(
    ("dtype", "num_heads", "num_kv_heads", "head_dim", "rope", "window", "softcap"),
    [
        (torch.bfloat16, 9, 3, 64, RopeConfig(100000.0, 64), None, None),  # SmolLM2-135M
        (torch.float32, 8, 2, 32, RopeConfig(10000.0, 16), 9, None),  # partial rotary, sliding window
        (torch.float16, 4, 4, 48, RopeConfig(10000.0, 48, "yarn", 4.0, attention_factor=1.2), None, 2.0),
        (torch.bfloat16, 6, 1, 128, RopeConfig(500000.0, 128, "llama3", 8.0), None, None),  # MQA
    ],
)
@pytest.mark.parametrize("lens", [DECODES, FEW_TOKENS], ids=["decode", "few-tokens"])
def test_matches_the_general_paths_ops_bit_for_bit(
    dtype, num_heads, num_kv_heads, head_dim, rope, window, softcap, lens
):
    batch, qkv, positions, attn = step(lens, dtype, num_heads, num_kv_heads, head_dim, window, softcap)
    rotary = RotaryEmbedding(rope)
    k_cache, v_cache = attn.k_cache.clone(), attn.v_cache.clone()
    fused_qkv = qkv.clone()
    out = fused(attn, batch, fused_qkv, rotary, positions)
    assert out is not None
    # the general path's ops, one by one, on the same input
    qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(-1, num_heads + num_kv_heads, head_dim)
    q, k = rotary.rotate_(positions, qk).split([num_heads, num_kv_heads], dim=1)
    value = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(-1, num_kv_heads, head_dim)
    expected = cpu_kernels.paged_decode_attention(
        q, k, value, k_cache, v_cache, batch.md, head_dim**-0.5, window, softcap
    )
    assert out.shape == (qkv.shape[0], num_heads * head_dim) and out.dtype == dtype
    assert torch.equal(out, expected.view(out.shape))
    assert torch.equal(fused_qkv, qkv)  # q and k rotated in place, as rotate_ does
    assert torch.equal(attn.k_cache, k_cache) and torch.equal(attn.v_cache, v_cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_rotation_and_sdpa(dtype):
    num_heads, num_kv_heads, head_dim, theta = 8, 2, 64, 10000.0
    batch, qkv, positions, attn = step(FEW_TOKENS, dtype, num_heads, num_kv_heads, head_dim)
    original = qkv.clone()
    out = fused(attn, batch, qkv, RotaryEmbedding(RopeConfig(theta, head_dim)), positions)
    # transformers' rotation: cos/sin of cat(freqs, freqs) in float32, cast to the dtype
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    q, k, v = original.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    q, k = apply_rotary_pos_emb(
        q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
        emb.cos().to(dtype), emb.sin().to(dtype),
    )  # fmt: skip
    assert torch.equal(qkv[:, : num_heads * head_dim].view(q.shape), q)
    slots = batch.md.slot_mapping
    assert torch.equal(attn.k_cache.view(-1, num_kv_heads, head_dim)[slots], k)
    assert torch.equal(attn.v_cache.view(-1, num_kv_heads, head_dim)[slots], v.view(k.shape))
    reference = reference_attention(
        PagedBatch(q, attn.k_cache, attn.v_cache, batch.md, batch.block_lists), head_dim**-0.5, None, None
    )
    assert out is not None
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.view(q.shape).float(), reference, atol=tol, rtol=tol)


def test_leaves_what_it_does_not_serve_to_the_general_path():
    batch, qkv, positions, attn = step(DECODES, torch.float32, 4, 2, 16)
    rotary = RotaryEmbedding(RopeConfig(10000.0, 16))
    long = make_batch(
        [9], [9], block_size=16, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32
    )  # a prefill chunk longer than the kernel's MAX_QUERY_LEN
    assert fused(attn, long, torch.randn(9, 8 * 16), rotary, torch.arange(9)) is None
    assert fused(attn, batch, qkv.bfloat16(), rotary, positions) is None  # not the cache's dtype
    attn.k_cache = attn.k_cache.to(torch.float8_e4m3fn)
    assert fused(attn, batch, qkv, rotary, positions) is None  # fp8 caches run on the torch backend


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])  # fused; q/k norms (general); soft-capping
def test_engine_decodes_as_transformers_does(arch, tmp_path, monkeypatch):
    from tiny_models import assert_decodes_as_transformers, make_tiny_model

    served = []
    rope_attention = Attention.rope_attention

    def counted(self: Attention, *args: torch.Tensor) -> torch.Tensor | None:
        out = rope_attention(self, *args)  # type: ignore[arg-type]
        served.append(out is not None)
        return out

    monkeypatch.setattr(Attention, "rope_attention", counted)
    prompts = [[5, 9, 17, 33, 2, 8, 100, 7, 12, 60, 61], [40, 41, 42]]
    assert_decodes_as_transformers(make_tiny_model(arch, tmp_path / arch), prompts)
    if arch == "qwen3":
        assert not served  # per-head q/k norms: the general path
    else:  # decodes fused, the 11-token prefill not
        assert any(served) and not all(served)
