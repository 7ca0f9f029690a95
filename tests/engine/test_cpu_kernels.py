"""The C++ CPU decode-attention kernel (pagoda/csrc/paged_decode.cpp) against torch SDPA on gathered,
contiguous K/V.

`make install` builds the kernel; a checkout without the build fails here rather than skipping. On an
AVX-512 machine the last test runs these tests again against an x86-64-v3 build (the image's: its portable
AVX2 kernel), in a process that loads it instead (`PAGODA_TEST_CPU_LIBRARY`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from other_build import rerun_under_x86_64_v3, use_requested_build
from test_triton_attention import TOLERANCE, make_batch, reference_attention

from pagoda.attention import cpu_kernels

OTHER_BUILD = use_requested_build()  # this process runs the x86-64-v3 build's code (other_build.py)

DECODES = ([1, 1, 1, 1, 1], [1, 17, 40, 33, 120])


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu_kernels.available(), "the C++ CPU kernel is not built: python -m pagoda.cpu_extension"


def decode_step(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int = 16):
    """A decode batch whose new K/V are not in the cache yet, as a layer sees it: the kernel writes them."""
    batch = make_batch(
        *DECODES, block_size=block_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=dtype,
    )
    slots = batch.md.slot_mapping
    key = batch.k_cache.view(-1, num_kv_heads, head_dim)[slots].clone()
    value = batch.v_cache.view(-1, num_kv_heads, head_dim)[slots].clone()
    return batch, key, value


@pytest.mark.parametrize(
    ("dtype", "num_heads", "num_kv_heads", "head_dim"),
    [
        (torch.float32, 9, 3, 64),  # SmolLM2-135M's heads
        (torch.bfloat16, 8, 2, 128),
        (torch.float16, 4, 4, 32),  # MHA
        (torch.bfloat16, 6, 1, 48),  # MQA, head dim not a power of two
    ],
)
def test_decode_matches_sdpa_and_writes_the_new_tokens(dtype, num_heads, num_kv_heads, head_dim):
    batch, key, value = decode_step(dtype, num_heads, num_kv_heads, head_dim)
    expected = reference_attention(batch, head_dim**-0.5, None, None)
    flat_k = batch.k_cache.view(-1, num_kv_heads, head_dim)
    flat_k[batch.md.slot_mapping] = 0  # the kernel must put this step's keys in place before attending
    batch.v_cache.view(-1, num_kv_heads, head_dim)[batch.md.slot_mapping] = 0
    out = cpu_kernels.paged_decode_attention(
        batch.query, key, value, batch.k_cache, batch.v_cache, batch.md, head_dim**-0.5, None, None
    )
    assert torch.equal(flat_k[batch.md.slot_mapping], key)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(("sliding_window", "softcap"), [(9, None), (None, 2.0), (6, 2.0)])
def test_window_and_softcap(sliding_window, softcap):
    batch, key, value = decode_step(torch.float32, 4, 2, 16, block_size=4)
    out = cpu_kernels.paged_decode_attention(
        batch.query, key, value, batch.k_cache, batch.v_cache, batch.md, 1.0, sliding_window, softcap
    )
    expected = reference_attention(batch, 1.0, sliding_window, softcap)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_strided_query_and_keys_from_a_fused_projection():
    batch, key, value = decode_step(torch.float32, 4, 2, 16)
    qkv = torch.cat([batch.query, key, value], dim=1)  # [N, 8, D]: the layout of a fused projection
    query, key, value = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    assert not query.is_contiguous()
    out = cpu_kernels.paged_decode_attention(
        query, key, value, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None
    )
    torch.testing.assert_close(out, reference_attention(batch, 0.25, None, None), atol=2e-5, rtol=2e-5)


def test_padding_slots_are_not_written():
    batch, key, value = decode_step(torch.float32, 4, 2, 16)
    before = batch.k_cache.clone()
    slots = batch.md.slot_mapping.clone()
    batch.md.slot_mapping[0] = -1  # a padded row: the kernel skips its write
    cpu_kernels.paged_decode_attention(
        batch.query, key, value, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None
    )
    flat_before, flat_after = before.view(-1, 2, 16), batch.k_cache.view(-1, 2, 16)
    assert torch.equal(flat_after[slots[0]], flat_before[slots[0]])
    assert torch.equal(flat_after[slots[1:]], key[1:])


def test_rejects_what_it_cannot_compute():
    batch, key, value = decode_step(torch.float32, 4, 2, 16)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_kernels.paged_decode_attention(
            batch.query.double(), key, value, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None
        )
    batch.md.block_tables[2, 0] = batch.k_cache.shape[0]  # a block past the pool: never read
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.paged_decode_attention(
            batch.query, key, value, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None
        )
    batch.md.block_tables[2, 0] = 0
    batch.md.slot_mapping[1] = batch.k_cache.shape[0] * batch.k_cache.shape[1]  # a slot past the pool
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_kernels.paged_decode_attention(
            batch.query, key, value, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None
        )
    with pytest.raises(RuntimeError, match="a key and a slot per query"):
        cpu_kernels.paged_decode_attention(
            batch.query[:3], key, value, batch.k_cache, batch.v_cache, batch.md, 0.25, None, None
        )


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])  # GQA; sliding window; soft-capping
def test_engine_decodes_through_the_kernel_as_transformers_does(arch, tmp_path, monkeypatch):
    from tiny_models import assert_decodes_as_transformers, make_tiny_model

    from pagoda.layers.attention import Attention

    calls = []
    kernel = cpu_kernels.paged_decode_attention
    monkeypatch.setattr(cpu_kernels, "paged_decode_attention", lambda *a: calls.append(1) or kernel(*a))
    # the decoder's fused decode op calls the kernel from C++ (tests/engine/test_decode_glue.py)
    fused = Attention.rope_attention

    def counted(*args):
        out = fused(*args)
        calls.extend([] if out is None else [1])
        return out

    monkeypatch.setattr(Attention, "rope_attention", counted)
    prompts = [[5, 9, 17, 33, 2, 8, 100, 7, 12], [40, 41, 42]]
    assert_decodes_as_transformers(make_tiny_model(arch, tmp_path / arch), prompts)
    assert calls  # the decode steps went through the C++ kernel


# speculative verification: a few new tokens per sequence (after cached prefixes), beside decodes
FEW_TOKENS = ([3, 1, 5, 2, 8], [3, 17, 40, 9, 120])


def assert_matches_sdpa(batch, scale: float, sliding_window: int | None, softcap: float | None) -> None:
    """The kernel, handed this step's K/V as the layer hands them (the batch's cache already holds them),
    against SDPA on the gathered contexts."""
    num_kv_heads, head_dim = batch.k_cache.shape[-2:]
    slots = batch.md.slot_mapping
    key = batch.k_cache.view(-1, num_kv_heads, head_dim)[slots].clone()
    value = batch.v_cache.view(-1, num_kv_heads, head_dim)[slots].clone()
    out = cpu_kernels.paged_decode_attention(
        batch.query, key, value, batch.k_cache, batch.v_cache, batch.md, scale, sliding_window, softcap
    )
    expected = reference_attention(batch, scale, sliding_window, softcap)
    tol = TOLERANCE[batch.query.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("dtype", "sliding_window", "softcap"),
    [
        (torch.float32, None, None),
        (torch.float32, 6, None),
        (torch.float32, None, 2.0),
        (torch.bfloat16, 7, 2.0),
    ],
)
def test_a_few_new_tokens_per_sequence_attend_causally(dtype, sliding_window, softcap):
    batch = make_batch(*FEW_TOKENS, block_size=4, num_heads=6, num_kv_heads=2, head_dim=32, dtype=dtype)
    assert_matches_sdpa(batch, 0.5, sliding_window, softcap)


@pytest.fixture
def four_threads():
    """Four intra-op threads, whatever the machine: the kernel then cuts long contexts into pieces merged by
    their log-sum-exp (it plans by the thread count, so this holds under `taskset -c 0` too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(threads)


# few sequences, long contexts: pieces of whole 16-key blocks, cut where windows and block edges do not align
LONG = ([1, 1, 4], [1000, 333, 517])


@pytest.mark.parametrize(
    ("dtype", "block_size", "sliding_window", "softcap"),
    [
        (torch.float32, 16, None, None),
        (torch.float32, 4, 300, None),  # the window starts inside a piece, the pieces inside cache blocks
        (torch.float32, 32, 45, 3.0),  # a window shorter than a piece: some pieces hold nothing for a row
        (torch.bfloat16, 16, 200, None),
        (torch.float16, 8, None, 2.0),
    ],
)
def test_long_contexts_split_across_threads(four_threads, dtype, block_size, sliding_window, softcap):
    batch = make_batch(*LONG, block_size=block_size, num_heads=6, num_kv_heads=2, head_dim=64, dtype=dtype)
    assert_matches_sdpa(batch, 0.125, sliding_window, softcap)


# many sequences of mixed lengths, as a busy decode step has: a task takes a sequence's KV heads side by side
# (as many as fit in 1 KiB of a cache row), so these cover one head per task, all of them, and blocks of them
# with a shorter last block; query lengths up to MAX_QUERY_LEN; with four threads, contexts cut into pieces
MANY = ([1, 8, 1, 3, 1, 1, 5, 1, 2, 1, 1, 1], [143, 459, 17, 200, 1, 64, 305, 33, 250, 16, 380, 97])


@pytest.mark.parametrize(
    ("dtype", "num_heads", "num_kv_heads", "head_dim", "sliding_window", "softcap"),
    [
        (torch.bfloat16, 9, 3, 64, None, None),  # SmolLM2-135M: the three heads in one task
        (torch.bfloat16, 8, 8, 128, None, None),  # MHA: blocks of four heads
        (torch.bfloat16, 24, 3, 128, 100, None),  # GQA 8, three heads of 256 bytes: one task
        (torch.float32, 15, 5, 64, None, 2.0),  # five heads of 256 bytes: blocks of three and two
        (torch.float16, 16, 2, 64, 37, None),
    ],
)
@pytest.mark.parametrize("threads", [1, 4])
def test_many_sequences_of_mixed_lengths(
    dtype, num_heads, num_kv_heads, head_dim, sliding_window, softcap, threads
):
    batch = make_batch(
        *MANY, block_size=16, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_sdpa(batch, head_dim**-0.5, sliding_window, softcap)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [8, 40, 112])  # padded to the widths the kernel is built for
def test_head_dims_between_the_compiled_widths(dtype, head_dim):
    # contexts around 16-key block edges: 1, 15, 16, 17, 32, 33 keys
    batch = make_batch(
        [1, 1, 1, 2, 1, 1], [1, 15, 16, 17, 32, 33], block_size=16, num_heads=4, num_kv_heads=2,
        head_dim=head_dim, dtype=dtype,
    )
    assert_matches_sdpa(batch, head_dim**-0.5, None, None)


def test_heads_wider_than_the_kernel_take_the_torch_path():
    assert cpu_kernels.serves(cpu_kernels.MAX_QUERY_LEN, cpu_kernels.MAX_HEAD_DIM)
    assert not cpu_kernels.serves(1, cpu_kernels.MAX_HEAD_DIM + 16)
    assert not cpu_kernels.serves(cpu_kernels.MAX_QUERY_LEN + 1, 64)
    head_dim = cpu_kernels.MAX_HEAD_DIM + 16
    batch = make_batch(
        [1, 2], [5, 20], block_size=4, num_heads=2, num_kv_heads=1, head_dim=head_dim, dtype=torch.float32
    )
    slots = batch.md.slot_mapping
    key = batch.k_cache.view(-1, 1, head_dim)[slots].clone()
    value = batch.v_cache.view(-1, 1, head_dim)[slots].clone()
    with pytest.raises(RuntimeError):  # the kernel itself refuses them rather than reading past its tiles
        cpu_kernels.paged_decode_attention(
            batch.query, key, value, batch.k_cache, batch.v_cache, batch.md, 0.05, None, None
        )


def test_the_x86_64_v3_build_passes_these_tests_too() -> None:
    """The portable (AVX2) kernel, as an x86-64-v3 image builds it, on a machine whose own build runs the
    AVX-512 one; the same cached build as test_tiled_matmul's (one per checkout and machine)."""
    if OTHER_BUILD or "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("the tests above ran the portable kernel")
    rerun_under_x86_64_v3(__file__)
