"""Mixture-of-experts pieces against their references: GGUF files written as llama.cpp writes MoE models,
gpt-oss's MXFP4 checkpoints against transformers' own dequantizer, and the routing of every family
against transformers' routers. (Whole-model parity runs with the dense families in test_models.py,
test_engine_parity.py and test_tensor_parallel.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize
from safetensors.torch import load_file, save_file
from test_gguf import llama_cpp_permute
from tiny_models import TINY_ARCHS, load_reference_model, make_tiny_model, reference_greedy, tiny_config
from transformers import AutoConfig, PretrainedConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from pagoda import LLM, SamplingParams
from pagoda.layers.moe import ExpertGroups, Routing, select_experts
from pagoda.loader import open_checkpoint
from pagoda.models.moe_weights import dequantize_mxfp4

MAX_NEW = 6
PROMPTS = [[5, 9, 33, 77, 100, 3, 18, 19, 200, 201, 7], [40, 41], [250, 7, 7, 7, 90, 12, 13]]


one_torch_thread = pytest.fixture(autouse=True, scope="module")(tiny_models.one_torch_thread)


def engine_greedy(model: Path | str, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(model=str(model), block_size=4, max_model_len=64, skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


# --- GGUF ------------------------------------------------------------------------------------------


# our tiny arch -> the GGUF architecture llama.cpp writes it as (Mixtral: a llama with experts)
GGUF_ARCH = {"qwen2_moe": "qwen2moe", "mixtral": "llama"}
# checkpoint module -> llama.cpp tensor kind; Mixtral's w1/w3/w2 experts are gate/up/down
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
EXPERT_NAMES = {
    "qwen2_moe": ("mlp.experts.{}.gate_proj", "mlp.experts.{}.up_proj", "mlp.experts.{}.down_proj"),
    "mixtral": tuple(f"block_sparse_moe.experts.{{}}.{w}" for w in ("w1", "w3", "w2")),
}


def write_moe_gguf(arch: str, hf_dir: Path, path: Path, expert_type: GGMLQuantizationType) -> None:
    """The tensors and metadata llama.cpp's convert_hf_to_gguf.py writes for Qwen2-MoE and Mixtral: experts
    stacked [E, ...] as ffn_*_exps, the router as ffn_gate_inp, Qwen's shared expert as ffn_*_shexp."""
    cfg = tiny_config(arch)
    num_experts = cfg.num_local_experts if arch == "mixtral" else cfg.num_experts
    weights = load_file(hf_dir / "model.safetensors")
    writer = GGUFWriter(path, GGUF_ARCH[arch])
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_expert_count(num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "qwen2_moe":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, tensor in weights.items():
        if name in top:
            writer.add_tensor(top[name], tensor.numpy())
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        stem, suffix = rest.rsplit(".", 1)
        if ".experts." in stem:
            continue  # stacked below
        if arch == "mixtral" and stem in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_attention_heads if stem.endswith("q_proj") else cfg.num_key_value_heads
            tensor = llama_cpp_permute(tensor, heads)
        writer.add_tensor(f"blk.{layer}.{GGUF_NAMES[stem]}.{suffix}", tensor.numpy())
    for layer in range(cfg.num_hidden_layers):
        for kind, expert_name in zip(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), EXPERT_NAMES[arch]):
            key = f"model.layers.{layer}.{expert_name}.weight"
            if key.format(0) not in weights:
                continue  # a dense layer
            stacked = torch.stack([weights[key.format(e)] for e in range(num_experts)]).numpy()
            data = stacked if expert_type == GGMLQuantizationType.F32 else quantize(stacked, expert_type)
            writer.add_tensor(f"blk.{layer}.{kind}.weight", data, raw_dtype=expert_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def qwen2_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("moe") / "qwen2_moe", with_tokenizer=False)


def test_gguf_with_stacked_experts_generates_like_transformers(qwen2_moe_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "qwen2moe.gguf"
    write_moe_gguf("qwen2_moe", qwen2_moe_dir, path, GGMLQuantizationType.F32)
    config = open_checkpoint(path).config
    assert config.architectures == ["Qwen2MoeForCausalLM"]
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (6, 2, False)
    assert config.mlp_only_layers == [1]  # layer 1 keeps a dense MLP: it has no ffn_*_exps tensors
    reference = load_reference_model(qwen2_moe_dir)
    assert engine_greedy(path, PROMPTS) == [reference_greedy(reference, p, MAX_NEW)[0] for p in PROMPTS]


def test_mixtral_gguf_is_a_llama_with_experts(tmp_path: Path) -> None:
    hf_dir = make_tiny_model("mixtral", tmp_path / "mixtral", with_tokenizer=False)
    path = tmp_path / "mixtral.gguf"
    write_moe_gguf("mixtral", hf_dir, path, GGMLQuantizationType.F32)
    config = open_checkpoint(path).config
    assert config.architectures == ["MixtralForCausalLM"]
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    reference = load_reference_model(hf_dir)
    assert engine_greedy(path, PROMPTS) == [reference_greedy(reference, p, MAX_NEW)[0] for p in PROMPTS]


def test_gguf_quantized_experts_dequantize_like_gguf_py(qwen2_moe_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "qwen2moe-q8.gguf"
    write_moe_gguf("qwen2_moe", qwen2_moe_dir, path, GGMLQuantizationType.Q8_0)
    weights = dict(open_checkpoint(path).weights())
    hf = load_file(qwen2_moe_dir / "model.safetensors")
    stacked = torch.stack([hf[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] for e in range(6)]).numpy()
    q8 = GGMLQuantizationType.Q8_0
    expected = torch.from_numpy(reference_dequantize(quantize(stacked, q8), q8))
    torch.testing.assert_close(weights["model.layers.0.mlp.experts.up_proj.weight"], expected)
    assert len(engine_greedy(path, PROMPTS[:1])[0]) == MAX_NEW  # the quantized file loads and serves


# --- gpt-oss MXFP4 ---------------------------------------------------------------------------------


def test_mxfp4_dequantizes_like_transformers() -> None:
    rng = np.random.default_rng(0)
    blocks = torch.from_numpy(rng.integers(0, 256, size=(3, 8, 2, 16), dtype=np.uint8))
    scales = torch.from_numpy(rng.integers(120, 134, size=(3, 8, 2), dtype=np.uint8))
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales), expected.transpose(1, 2), rtol=0, atol=0)


def test_gpt_oss_mxfp4_checkpoint_generates_like_transformers(tmp_path: Path) -> None:
    """Released gpt-oss checkpoints store experts as MXFP4 blocks and scales; the reference runs the
    weights transformers dequantizes them to."""
    path = make_tiny_model("gpt_oss", tmp_path / "gpt_oss", with_tokenizer=False)
    weights = load_file(path / "model.safetensors")
    rng = np.random.default_rng(1)
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, columns, rows = weights[name].shape  # [E, in, out]
        groups = (experts, rows, columns // 32)
        blocks = torch.from_numpy(rng.integers(0, 256, size=(*groups, 16), dtype=np.uint8))
        scales = torch.from_numpy(rng.integers(123, 127, size=groups, dtype=np.uint8))
        del weights[name]
        weights[f"{name}_blocks"], weights[f"{name}_scales"] = blocks, scales
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})

    dequantized = dict(weights)
    for name in [n for n in weights if n.endswith("_blocks")]:
        stem = name.removesuffix("_blocks")
        dequantized[stem] = convert_moe_packed_tensors(
            dequantized.pop(name), dequantized.pop(f"{stem}_scales"), dtype=torch.float32
        )
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    (reference_dir / "config.json").write_text((path / "config.json").read_text())
    save_file(dequantized, reference_dir / "model.safetensors", metadata={"format": "pt"})
    reference = load_reference_model(reference_dir)
    assert engine_greedy(path, PROMPTS) == [reference_greedy(reference, p, MAX_NEW)[0] for p in PROMPTS]


# --- routing ---------------------------------------------------------------------------------------


def by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (ids, weights) in expert order: transformers' DeepSeek routers leave them unsorted."""
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


def router_config(arch: str, **overrides: object) -> PretrainedConfig:
    cfg = tiny_config(arch) if arch in TINY_ARCHS else AutoConfig.for_model(arch, hidden_size=64)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize(
    ("router_cls", "cfg", "routing"),
    [
        (Qwen2MoeTopKRouter, router_config("qwen2_moe"), Routing(2, renormalize=False)),
        (Qwen2MoeTopKRouter, router_config("qwen2_moe", norm_topk_prob=True), Routing(2)),
        (MixtralTopKRouter, router_config("mixtral"), Routing(2)),
        (
            DeepseekV2TopkRouter,
            router_config("deepseek_v2", n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
                          topk_method="group_limited_greedy", routed_scaling_factor=2.5),
            Routing(3, renormalize=False, num_groups=4, topk_groups=2, scale=2.5),
        ),
        (
            DeepseekV3TopkRouter,
            router_config("deepseek_v3", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                          norm_topk_prob=True, routed_scaling_factor=2.5),
            Routing(4, "sigmoid", num_groups=4, topk_groups=2, scale=2.5),
        ),
    ],
    ids=["qwen2_moe", "renormalized", "mixtral", "deepseek_v2_groups", "deepseek_v3_sigmoid_groups"],
)
def test_routing_matches_transformers(router_cls: type, cfg: PretrainedConfig, routing: Routing) -> None:
    torch.manual_seed(0)
    router = router_cls(cfg)
    torch.nn.init.normal_(router.weight)
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is not None:  # V3: a correction large enough to change which experts win
        bias.copy_(torch.randn_like(bias) * 0.5)
    x = torch.randn(64, cfg.hidden_size)
    _, expected_weights, expected_ids = router(x)
    weights, ids = select_experts(torch.nn.functional.linear(x, router.weight), routing, bias)
    expected_weights, expected_ids = by_expert(expected_weights, expected_ids)
    weights, ids = by_expert(weights, ids)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights.float())


def test_tokens_are_grouped_by_expert_in_batch_order() -> None:
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0]])
    weights = torch.arange(8, dtype=torch.float32).view(4, 2)
    groups = ExpertGroups.from_routing(weights, ids, num_experts=5)
    assert groups.counts == [3, 2, 2, 1, 0]
    assert groups.tokens.tolist() == [0, 1, 3, 1, 2, 0, 2, 3]
    assert groups.weights.tolist() == [1, 2, 7, 3, 5, 0, 4, 6]
    runs = [(e, (r.start, r.stop)) for e, r in groups.runs()]
    assert runs == [(0, (0, 3)), (1, (3, 5)), (2, (5, 7)), (3, (7, 8))]


# --- multi-head latent attention -------------------------------------------------------------------


def test_mla_cache_holds_one_latent_row_per_token(tmp_path: Path) -> None:
    path = make_tiny_model("deepseek_v3", tmp_path / "deepseek_v3", with_tokenizer=False)
    llm = LLM(model=str(path), block_size=4, max_model_len=64, skip_tokenizer_init=True)
    cfg = tiny_config("deepseek_v3")
    runner = llm.engine.runner
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 40 values, against 2 x 4 heads x 24 for plain K/V
    assert runner.block_bytes == cfg.num_hidden_layers * latent * 4 * 4  # layers x latent x slots x fp32
    layer = runner.attention_layers[0]
    assert layer.k_cache is layer.v_cache and layer.k_cache.shape[1:] == (4, 1, latent)
