"""Routed experts under `quantization="int8"` / `"fp8"` / `"gguf"`: each expert's weights are quantized as
a dense layer's are (not left in float), the layer's output stays close to full precision's, and whole MoE
models keep full precision's prompt logprobs and most of its greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_models
import torch
from gguf import GGMLQuantizationType
from test_moe import write_moe_gguf
from tiny_models import make_tiny_model

from pagoda import LLM, SamplingParams
from pagoda.layers.moe import DOWN, GATE, UP, FusedMoE
from pagoda.quantization import process_weights_after_loading, quantized_layers, weight_bytes

E, H, I, TOKENS, TOP_K = 4, 64, 48, 40, 2  # noqa: E741 (the expert intermediate size)
# bfloat16 activations (the CPU kernels' operands) on top of each format's weight error, as for dense layers
TOLERANCE = {"int8": 2e-2, "fp8": 6e-2}


one_torch_thread = pytest.fixture(autouse=True, scope="module")(tiny_models.one_torch_thread)


def loaded_experts(quantization: str | None, weights: dict[str, torch.Tensor]) -> FusedMoE:
    with quantized_layers(quantization):
        layer = FusedMoE(E, H, I, bias=True, swiglu_limit=7.0)  # gpt-oss's: biases and the clamp
    for expert in range(E):
        for part, name in ((GATE, "gate"), (UP, "up"), (DOWN, "down")):
            param = layer.w2 if part == DOWN else layer.w13
            bias = layer.w2_bias if part == DOWN else layer.w13_bias
            param.weight_loader(param, weights[name][expert], (expert, part))
            bias.weight_loader(bias, weights[f"{name}_bias"][expert], (expert, part))
    process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_quantized_experts_multiply_close_to_full_precision(quantization: str) -> None:
    torch.manual_seed(0)
    scales = torch.linspace(0.02, 0.3, I)[:, None]  # rows of different ranges: per-row scales matter
    weights = {
        "gate": torch.randn(E, I, H) * scales, "up": torch.randn(E, I, H) * scales,
        "down": torch.randn(E, H, I) * 0.1,
        "gate_bias": torch.randn(E, I) * 0.1, "up_bias": torch.randn(E, I) * 0.1,
        "down_bias": torch.randn(E, H) * 0.1,
    }
    full, quantized = loaded_experts(None, weights), loaded_experts(quantization, weights)
    assert quantized.quantized is not None and quantized.w13 is None  # no float copy left behind
    x = torch.randn(TOKENS, H)
    routing_weights, ids = torch.rand(TOKENS, E).softmax(-1).topk(TOP_K, dim=-1)
    expected = full(x, routing_weights, ids)
    out = quantized(x, routing_weights, ids)
    assert float((out - expected).norm() / expected.norm()) < TOLERANCE[quantization]
    # the experts' weights take a quarter of float32's bytes (plus one float32 scale per row)
    float_bytes = 4 * E * (2 * I * H + H * I)
    assert weight_bytes(quantized) - weight_bytes(full) < -0.7 * float_bytes


# --- whole models -------------------------------------------------------------------------------------

PROMPTS = [[1 + (7 * i + 3 * j) % 250 for j in range(6 + 4 * i)] for i in range(5)]


def run(path: Path, **options: object) -> tuple[list[list[int]], list[list[float]], int]:
    """Greedy tokens, prompt logprobs of every prompt token, and the routed experts' weight bytes."""
    llm = LLM(str(path), kv_cache_memory=1 << 20, max_num_seqs=8, skip_tokenizer_init=True, **options)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    logprobs = [[lp[t] for t, lp in zip(p, o.prompt_logprobs) if lp] for p, o in zip(PROMPTS, outputs)]
    experts = [m for m in llm.engine.runner.model.modules() if isinstance(m, FusedMoE)]
    return [list(o.outputs[0].token_ids) for o in outputs], logprobs, sum(map(weight_bytes, experts))


def mean_logprob_change(reference: list[list[float]], other: list[list[float]]) -> float:
    return float(torch.tensor([a - b for r, o in zip(reference, other) for a, b in zip(r, o)]).abs().mean())


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of reference tokens reproduced before each sequence's first differing token."""
    matched = sum(next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r))
                  for r, o in zip(reference, other))
    return matched / sum(map(len, reference))


# The tiny random models' large activations make them fragile: the same model in bfloat16 moves the
# prompt logprobs by 0.04 (Qwen3-MoE) to 0.09 (gpt-oss) nats on average and keeps 85-90% of the greedy
# tokens. int8 everywhere: 0.06 / 0.17 and 80%, the same as int8 dense layers with float experts (0.055 /
# 0.167); a wrong scale or a transposed expert moves them by nats. Judged against bfloat16 in the same run.
@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_int8_moe_model_keeps_full_precision_logprobs(arch: str, tmp_path: Path) -> None:
    path = make_tiny_model(arch, tmp_path / arch, with_tokenizer=False)
    full_tokens, full_logprobs, full_bytes = run(path)
    _, bf16_logprobs, _ = run(path, dtype="bfloat16")
    tokens, logprobs, int8_bytes = run(path, quantization="int8")
    assert int8_bytes < 0.3 * full_bytes  # a byte per weight, a float32 scale per row, biases in float
    bf16_change = mean_logprob_change(full_logprobs, bf16_logprobs)
    assert mean_logprob_change(full_logprobs, logprobs) < 2.5 * bf16_change
    assert greedy_agreement(full_tokens, tokens) >= 0.6
    if arch == "qwen3_moe":  # each rank quantizes its own slice of every expert (scales per sliced row)
        tp_tokens, tp_logprobs, _ = run(path, quantization="int8", tensor_parallel_size=2)
        assert mean_logprob_change(full_logprobs, tp_logprobs) < 2.5 * bf16_change
        assert greedy_agreement(full_tokens, tp_tokens) >= 0.6


@pytest.mark.parametrize("expert_type", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0])
def test_gguf_experts_stay_in_their_blocks(expert_type: GGMLQuantizationType, tmp_path: Path) -> None:
    """A GGUF file's quantized experts are multiplied in their own blocks (the default for a quantized
    file), and give what their float expansion (quantization="none") gives, up to bfloat16 activations."""
    hf_dir = make_tiny_model("qwen2_moe", tmp_path / "hf", with_tokenizer=False)
    path = tmp_path / "experts.gguf"
    write_moe_gguf("qwen2_moe", hf_dir, path, expert_type)
    # float32 both (dtype="auto" would compute a quantized file in bfloat16 on CPUs that have it)
    expanded_tokens, expanded_logprobs, expanded_bytes = run(path, quantization="none", dtype="float32")
    tokens, logprobs, block_bytes = run(path, dtype="float32")
    assert block_bytes < 0.4 * expanded_bytes  # 8.5 or 4.5 bits a weight against float32's 32
    # only the activations' rounding to bfloat16 differs: as close as the bfloat16 model is to float32
    assert mean_logprob_change(expanded_logprobs, logprobs) < 0.1
    assert greedy_agreement(expanded_tokens, tokens) >= 0.6
