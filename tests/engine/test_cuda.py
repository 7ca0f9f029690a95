"""On a CUDA GPU: the compiled Triton kernels at serving-sized shapes, and the whole engine on the GPU.

CI has no GPU, so there every test here is reported as skipped (never as passed). On a GPU machine:
`pytest tests/engine/test_cuda.py`. The kernels are checked against the same torch references as the
interpreted tests; the engine's greedy tokens (float32, exact fp32 dots) against transformers on the CPU.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_quantization import build_linear, gguf_weight, reference_weight, relative_error
from test_triton_attention import MIXED, PagedBatch, assert_matches_reference, make_batch
from tiny_models import TINY_ARCHS, load_reference_model, make_tiny_model, reference_greedy

from pagoda import LLM, SamplingParams
from pagoda.quantization.gguf_blocks import group_quantized_from_blocks
from pagoda.quantization.grouped import GroupQuantized
from pagoda.quantization.methods import _has_fp8_matmul

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def on_cuda(batch: PagedBatch) -> PagedBatch:
    md = batch.md
    md = replace(
        md,
        slot_mapping=md.slot_mapping.to(CUDA),
        query_start_loc=md.query_start_loc.to(CUDA),
        seq_lens=md.seq_lens.to(CUDA),
        block_tables=md.block_tables.to(CUDA),
    )
    return replace(
        batch,
        query=batch.query.to(CUDA),
        k_cache=batch.k_cache.to(CUDA),
        v_cache=batch.v_cache.to(CUDA),
        md=md,
    )


def on_cpu(batch: PagedBatch) -> PagedBatch:
    return replace(batch, query=batch.query.cpu(), k_cache=batch.k_cache.cpu(), v_cache=batch.v_cache.cpu())


def serving_lens(num_seqs: int, seed: int) -> tuple[list[int], list[int]]:
    """A serving-like step: mostly decodes over long contexts, a few prefill chunks after cached tokens."""
    rng = random.Random(seed)
    query_lens, seq_lens = [], []
    for _ in range(num_seqs):
        q = 1 if rng.random() < 0.8 else rng.randint(2, 300)
        query_lens.append(q)
        seq_lens.append(q + rng.randint(0, 2000))
    return query_lens, seq_lens


@pytest.mark.parametrize(
    ("num_seqs", "block_size", "num_heads", "num_kv_heads", "head_dim", "dtype"),
    [
        (24, 16, 32, 8, 128, torch.bfloat16),  # Llama-3-8B heads
        (24, 16, 14, 2, 64, torch.float16),  # Qwen2-0.5B heads: a group of 7
        (8, 32, 9, 3, 64, torch.float32),  # SmolLM2-135M heads, exact fp32 dots
        (4, 16, 16, 1, 256, torch.bfloat16),  # MQA, Gemma's head dim
    ],
    ids=["llama3-bf16", "qwen2-fp16", "smollm2-fp32", "mqa-d256-bf16"],
)
def test_compiled_paged_attention_matches_reference(
    num_seqs, block_size, num_heads, num_kv_heads, head_dim, dtype
):
    from pagoda.attention import triton_backend

    batch = make_batch(
        *serving_lens(num_seqs, seed=num_heads),
        block_size=block_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )
    gpu = on_cuda(batch)
    scale = head_dim**-0.5
    out = triton_backend.paged_attention(gpu.query, gpu.k_cache, gpu.v_cache, gpu.md, scale, None, None)
    assert_matches_reference(out.cpu(), batch, scale)


@pytest.mark.parametrize(("sliding_window", "softcap"), [(64, None), (None, 30.0), (300, 50.0)])
def test_compiled_window_and_softcap(sliding_window, softcap):
    from pagoda.attention import triton_backend

    batch = make_batch(
        *serving_lens(12, seed=3),
        block_size=16,
        num_heads=8,
        num_kv_heads=4,
        head_dim=128,
        dtype=torch.bfloat16,
    )
    gpu = on_cuda(batch)
    out = triton_backend.paged_attention(
        gpu.query, gpu.k_cache, gpu.v_cache, gpu.md, 0.1, sliding_window, softcap
    )
    assert_matches_reference(out.cpu(), batch, 0.1, sliding_window, softcap)


def test_compiled_write_kv_then_attend():
    from pagoda.attention import triton_backend

    batch = make_batch(*MIXED, block_size=16, num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float16)
    gpu = on_cuda(batch)
    kv = torch.randn(gpu.query.shape[0], 4, 64, dtype=torch.float16, device=CUDA)  # fused K|V: strided
    triton_backend.write_kv(kv[:, :2], kv[:, 2:], gpu.k_cache, gpu.v_cache, gpu.md.slot_mapping)
    assert torch.equal(gpu.k_cache.view(-1, 2, 64)[gpu.md.slot_mapping], kv[:, :2])
    assert torch.equal(gpu.v_cache.view(-1, 2, 64)[gpu.md.slot_mapping], kv[:, 2:])
    out = triton_backend.paged_attention(gpu.query, gpu.k_cache, gpu.v_cache, gpu.md, 0.125, None, None)
    assert_matches_reference(out.cpu(), on_cpu(gpu), 0.125)
    # as the layer calls it: this step's keys read from the strided projection output
    out = triton_backend.paged_attention(
        gpu.query, gpu.k_cache, gpu.v_cache, gpu.md, 0.125, None, None, new_kv=(kv[:, :2], kv[:, 2:])
    )
    assert_matches_reference(out.cpu(), on_cpu(gpu), 0.125)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "sliding_window"),
    [(32, 8, 128, None), (14, 2, 64, None), (8, 4, 128, 100), (16, 1, 256, None)],
    ids=["llama3", "qwen2-group7", "window", "mqa-d256"],
)
def test_compiled_prefill_reads_this_steps_keys_from_the_projection(
    num_heads, num_kv_heads, head_dim, sliding_window
):
    from pagoda.attention import triton_backend

    # prefill chunks of up to 600 tokens, some after cached prefixes, beside decodes
    lens = ([600, 1, 257, 1, 130, 64], [600, 700, 1257, 33, 130, 1100])
    batch = make_batch(
        *lens, block_size=16, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=torch.bfloat16,
    )
    gpu = on_cuda(batch)
    slots = gpu.md.slot_mapping
    flat_k = gpu.k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = gpu.v_cache.view(-1, num_kv_heads, head_dim)
    new_kv = flat_k[slots].clone(), flat_v[slots].clone()
    flat_k[slots] = float("nan")  # read from new_kv, never from this step's cache slots
    flat_v[slots] = float("nan")
    scale = head_dim**-0.5
    out = triton_backend.paged_attention(
        gpu.query, gpu.k_cache, gpu.v_cache, gpu.md, scale, sliding_window, None, new_kv=new_kv
    )
    assert_matches_reference(out.cpu(), batch, scale, sliding_window)


@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("num_tokens", [1, 37])
def test_compiled_dequant_matmul_matches_reference(ggml_type, num_tokens):
    from gguf import GGMLQuantizationType

    from pagoda.quantization.triton_kernels import TritonQuantizedWeight

    weight = gguf_weight(GGMLQuantizationType[ggml_type], 200, 512)
    grouped = group_quantized_from_blocks(weight)
    on_gpu = GroupQuantized(
        grouped.q.to(CUDA),
        grouped.scale.to(CUDA),
        None if grouped.offset is None else grouped.offset.to(CUDA),
        grouped.bits,
    )
    x = torch.randn(num_tokens, 512)
    out = TritonQuantizedWeight(on_gpu).matmul(x.to(CUDA, torch.float16))
    expected = F.linear(x, reference_weight(weight))
    assert (out.float().cpu() - expected).norm() / expected.norm() < 5e-3  # fp16 operands


@pytest.mark.parametrize("quantization", ["fp8", "int8"])
def test_quantized_linear_on_cuda(quantization: str) -> None:
    weight = torch.randn(256, 512) * torch.linspace(0.01, 3.0, 256)[:, None]
    with torch.device(CUDA):
        layer = build_linear(quantization, weight.to(CUDA))
    x = torch.randn(33, 512)
    xb = x.to(CUDA, torch.bfloat16)
    if quantization == "fp8":  # the H100/H200 path: cuBLASLt's fp8 GEMM, activations scaled per row
        assert _has_fp8_matmul(xb, layer.quantized.weight)
    out = layer(xb).float().cpu()
    # bf16 activations (and fp8 ones for fp8) on top of each format's own weight error
    assert relative_error(out, F.linear(x, weight)) < (6e-2 if quantization == "fp8" else 2e-2)


# --- the engine on the GPU -------------------------------------------------------------------------------

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-cuda")
    return {arch: make_tiny_model(arch, root / arch) for arch in TINY_ARCHS}


def prompts(n: int, seed: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 256) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def greedy(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [
        o.outputs[0].token_ids
        for o in llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    ]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_engine_on_cuda_equals_transformers(arch: str, model_dirs: dict[str, Path]) -> None:
    batch = prompts(8, seed=TINY_ARCHS.index(arch), shared_prefix=20)
    reference = load_reference_model(model_dirs[arch])
    want = [reference_greedy(reference, p, MAX_NEW)[0] for p in batch]
    # a tiny pool and token budget: prefix-cache hits, preemption and chunked prefill all on the GPU
    llm = LLM(
        model=str(model_dirs[arch]),
        device="cuda",
        dtype="float32",
        block_size=16,
        max_model_len=80,
        num_gpu_blocks_override=12,
        max_num_batched_tokens=48,
    )
    assert llm.engine.runner.device.type == "cuda"
    assert greedy(llm, batch[:1]) == want[:1]
    assert greedy(llm, batch) == want
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hits > 0 and stats.kv_cache_usage == 0.0
    if llm.engine.runner.model.supports_cuda_graphs:
        assert llm.engine.runner.graphs.replays > 0  # decode steps ran as CUDA graphs
        assert llm.engine.runner.run_ahead.num_taken > 0  # asynchronous scheduling, on with them
    else:  # MoE routing / torch-backend attention (sinks, MLA) run eagerly
        assert llm.engine.runner.graphs is None


def test_cuda_graphs_equal_eager_steps(model_dirs: dict[str, Path]) -> None:
    # 13 sequences of different lengths: decode batches pad to captured sizes (16, then smaller ones as
    # sequences finish), contexts grow past several blocks while the graphs stay the same
    rng = random.Random(3)
    batch = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 60))] for _ in range(13)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(13)]
    outputs = {}
    for eager in (True, False):
        llm = LLM(model=str(model_dirs["qwen2"]), device="cuda", dtype="float32", max_model_len=128,
                  max_num_seqs=20, enforce_eager=eager)
        assert (llm.engine.runner.graphs is None) == eager
        result = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        outputs[eager] = [o.outputs[0].token_ids for o in result]
    assert outputs[False] == outputs[True]
    assert llm.engine.runner.graphs.sizes == [1, 2, 4, 8, 16, 20]


def test_async_scheduling_on_cuda_equals_transformers(model_dirs: dict[str, Path]) -> None:
    # 13 sequences ending at different steps, two of them on a stop token the host sees a step late: the
    # guessed steps keep the others' rows, and the graphs' batch sizes shrink as sequences end
    rng = random.Random(4)
    batch = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 60))] for _ in range(13)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(13)]
    reference = load_reference_model(model_dirs["llama"])
    want = [reference_greedy(reference, p, sp.max_tokens)[0] for p, sp in zip(batch, params)]
    for i in (2, 7):
        stop = want[i][3]
        params[i] = replace(params[i], stop_token_ids=[stop])
        want[i] = want[i][: want[i].index(stop) + 1]
    llm = LLM(model=str(model_dirs["llama"]), device="cuda", dtype="float32", max_model_len=128,
              max_num_seqs=20)
    run_ahead = llm.engine.runner.run_ahead
    assert run_ahead is not None  # on by default with CUDA graphs
    result = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in result] == want
    assert run_ahead.num_taken > 20 and llm.engine.get_stats().kv_cache_usage == 0.0
    # unseeded sampling on the device runs ahead too
    sampled = llm.generate(["hello"], SamplingParams(temperature=1.0, top_p=0.9, n=4, max_tokens=24,
                                                     ignore_eos=True), use_tqdm=False)
    assert [len(c.token_ids) for c in sampled[0].outputs] == [24] * 4


@pytest.mark.parametrize(
    "options", [{"quantization": "fp8"}, {"quantization": "int8"}, {"kv_cache_dtype": "fp8"}],
    ids=["fp8", "int8", "kv-fp8"],
)
def test_quantized_engine_runs_on_cuda(options: dict, model_dirs: dict[str, Path]) -> None:
    batch = prompts(6, seed=9)
    path = str(model_dirs["llama"])
    full = greedy(LLM(model=path, device="cuda", max_model_len=80), batch)
    quantized = greedy(LLM(model=path, device="cuda", max_model_len=80, **options), batch)
    assert all(len(q) == MAX_NEW for q in quantized)
    # the first tokens mostly agree with bfloat16's (the layers' numbers are checked above)
    assert sum(f[0] == q[0] for f, q in zip(full, quantized)) >= len(batch) // 2


def test_engine_on_cuda_profiles_memory_for_the_kv_pool(model_dirs: dict[str, Path]) -> None:
    llm = LLM(model=str(model_dirs["llama"]), device="cuda", gpu_memory_utilization=0.3, max_model_len=64)
    runner = llm.engine.runner
    pool_bytes = runner.num_blocks * runner.block_bytes
    # sized from the GPU's memory (or capped at what max_num_seqs full-length sequences can use)
    useful = llm.engine.config.max_num_seqs * 64 // runner.block_size
    assert runner.num_blocks == useful or pool_bytes > 0.1 * torch.cuda.get_device_properties(0).total_memory
    assert runner.dtype == torch.bfloat16  # auto on a GPU: half precision
    out = llm.generate(["hello world"], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_fused_moe_kernel_matches_the_torch_expert_loop(dtype: torch.dtype, num_tokens: int) -> None:
    """The compiled grouped GEMM at a Qwen3-MoE-like layer (128 experts of 768, top-8, hidden 2048)."""
    from pagoda.layers.fused_moe_triton import fused_experts
    from pagoda.layers.moe import ExpertGroups, FusedMoE, Routing, select_experts

    torch.manual_seed(num_tokens)
    with torch.device("cuda"):
        moe = FusedMoE(128, 2048, 768).to(dtype)
        for param in moe.parameters():
            param.data.normal_(0.0, 0.02)
        x = torch.randn(num_tokens, 2048, dtype=dtype)
        weights, ids = select_experts(torch.randn(num_tokens, 128), Routing(8))
    groups = ExpertGroups.from_routing(weights, ids, 128)
    got, want = fused_experts(x, moe, groups).float(), moe.experts_torch(x, groups).float()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert relative_error(got, want) < tolerance


# --- the one-launch element-wise kernels (RMSNorm, RoPE, SiLU-and-mul) at serving shapes -----------------


def torch_and_triton(monkeypatch: pytest.MonkeyPatch, op: str, layer_call):
    """The layer's output through its Triton kernel, then through its torch code (the kernel declined)."""
    from pagoda.layers import triton_ops

    kernel, calls = getattr(triton_ops, op), []
    monkeypatch.setattr(triton_ops, op, lambda *args: calls.append(1) or kernel(*args))
    fused = layer_call()
    assert calls, f"the layer did not call triton_ops.{op}"
    monkeypatch.setattr(triton_ops, op, lambda *args: None)
    return fused, layer_call()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("rows", [1, 300])
def test_compiled_rms_norm_matches_the_torch_layer(monkeypatch, dtype, unit_offset, rows):
    from test_triton_layers import assert_nearly_equal

    from pagoda.layers.norm import RMSNorm

    layer = RMSNorm(4096, 1e-5, unit_offset).to(CUDA)
    layer.weight.data = torch.randn(4096, device=CUDA).to(dtype)
    x = torch.randn(rows, 4096, device=CUDA).to(dtype)
    fused, reference = torch_and_triton(monkeypatch, "rms_norm", lambda: layer(x))
    # the mean of squares sums in the kernel's own order; all else rounds as torch does
    assert_nearly_equal(fused, reference, 4, 1.0 if dtype == torch.float32 else 0.01)
    # multiples of 1/8 below 4: the squares sum exactly in any order, so the results are equal
    x = (torch.randint(-32, 33, (rows, 4096), device=CUDA) / 8).to(dtype)
    fused, reference = torch_and_triton(monkeypatch, "rms_norm", lambda: layer(x))
    assert torch.equal(fused, reference)
    # Qwen3's per-head norm of a strided view of the fused qkv output
    head_norm = RMSNorm(128, 1e-6, unit_offset).to(CUDA)
    head_norm.weight.data = torch.randn(128, device=CUDA).to(dtype)
    q = torch.randn(rows, 48 * 128, device=CUDA).to(dtype)[:, : 32 * 128].reshape(rows, 32, 128)
    fused, reference = torch_and_triton(monkeypatch, "rms_norm", lambda: head_norm(q))
    assert_nearly_equal(fused, reference, 4, 1.0 if dtype == torch.float32 else 0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("rows", [1, 300])
def test_compiled_add_rms_norm_matches_the_torch_add_and_layer(monkeypatch, dtype, unit_offset, rows):
    from test_triton_layers import assert_nearly_equal

    from pagoda.layers import triton_ops
    from pagoda.layers.norm import RMSNorm

    layer = RMSNorm(4096, 1e-5, unit_offset).to(CUDA)
    layer.weight.data = torch.randn(4096, device=CUDA).to(dtype)
    x = (torch.randn(rows, 4096, device=CUDA) * 300).to(dtype)
    residual = torch.randn(rows, 4096, device=CUDA).to(dtype)
    fused, calls = triton_ops.add_rms_norm, []
    monkeypatch.setattr(triton_ops, "add_rms_norm", lambda *args: calls.append(1) or fused(*args))
    got, got_sum = layer(x, residual)
    assert calls, "the layer did not call triton_ops.add_rms_norm"
    for op in ("add_rms_norm", "rms_norm"):  # the reference: torch's add and norm
        monkeypatch.setattr(triton_ops, op, lambda *args: None)
    want, want_sum = layer(x, residual)
    assert torch.equal(got_sum, want_sum)
    # the mean of squares sums in the kernel's own order; all else rounds as torch does
    assert_nearly_equal(got, want, 4, 1.0 if dtype == torch.float32 else 0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 300])
def test_compiled_rotate_and_write_kv_equals_the_rotation_then_write_kv(dtype, rows):
    from pagoda.attention import triton_backend
    from pagoda.layers import triton_ops
    from pagoda.layers.rotary import RopeConfig, RotaryEmbedding

    rope = RotaryEmbedding(RopeConfig(500000.0, 128, "llama3", factor=8.0)).to(CUDA)
    positions = torch.randint(0, 8000, (rows,), device=CUDA)
    qkv = torch.randn(rows, 48 * 128, device=CUDA).to(dtype)  # Llama-3-8B: 32 query, 8 key, 8 value heads
    caches = [torch.randn(40, 16, 8, 128, device=CUDA).to(dtype) for _ in range(2)]
    caches += [cache.clone() for cache in caches]
    slots = torch.randperm(640, device=CUDA)[:rows]
    slots[0] = -1  # padding: written nowhere
    cos, signed_sin = rope.cos_sin(positions, dtype)
    want = triton_ops.rotate(qkv[:, : 40 * 128].view(rows, 40, 128), cos, signed_sin)
    triton_backend.write_kv(want[:, 32:], qkv[:, 40 * 128 :].view(rows, 8, 128), caches[0], caches[1], slots)
    got = triton_ops.rotate_and_write_kv(qkv, 32, cos, signed_sin, caches[2], caches[3], slots)
    assert torch.equal(got, want)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 300])
def test_compiled_rotary_equals_the_torch_rotation(monkeypatch, dtype, rows):
    from pagoda.layers.rotary import RopeConfig, RotaryEmbedding

    # Llama-3-8B: 32 query + 8 key heads of 128, a strided view of the fused qkv output
    rope = RotaryEmbedding(RopeConfig(500000.0, 128, "llama3", factor=8.0)).to(CUDA)
    positions = torch.randint(0, 8000, (rows,), device=CUDA)
    qkv = torch.randn(rows, 48 * 128, device=CUDA).to(dtype)
    heads = qkv[:, : 40 * 128].view(rows, 40, 128)
    fused, reference = torch_and_triton(monkeypatch, "rotate", lambda: rope(positions, heads))
    assert torch.equal(fused, reference)
    partial = RotaryEmbedding(RopeConfig(10000.0, 64)).to(CUDA)  # rotary_dim 64 of 128
    fused, reference = torch_and_triton(monkeypatch, "rotate", lambda: partial(positions, heads))
    assert torch.equal(fused, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 300])
def test_compiled_silu_and_mul_equals_the_torch_layer(monkeypatch, dtype, rows):
    from pagoda.layers.activation import GatedActivation

    act = GatedActivation("silu")
    x = (torch.randn(rows, 2 * 14336, device=CUDA) * 4).to(dtype)  # Llama-3-8B's gate|up
    fused, reference = torch_and_triton(monkeypatch, "silu_and_mul", lambda: act(x))
    assert torch.equal(fused, reference)
