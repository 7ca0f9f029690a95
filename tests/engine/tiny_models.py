"""Tiny, randomly initialised Hugging Face models of every supported architecture, saved to a directory.

    from tiny_models import TINY_ARCHS, make_tiny_model, load_reference_model, reference_greedy
    path = make_tiny_model("llama", tmp_path / "llama")   # config.json + model.safetensors + tokenizer

Weights are drawn with a large std (and norms/biases perturbed away from their 1/0 init), so greedy
logits are far from ties and every weight matters. Each architecture also exercises a feature: GQA, MQA,
tied/untied embeddings, RoPE scalings, sliding windows shorter than the test prompts, soft-capping; the
mixtures of experts route each token to several of 4-8 experts (MOE_ARCHS).
The tokenizer is byte-level (any text round-trips) with a toy chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

VOCAB_SIZE = 384  # 256 bytes + 3 specials + filler tokens
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
SLIDING_WINDOW = 5  # shorter than the test prompts, so windows really cut context

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.3,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

# name -> (model_type, config overrides)
_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    # SmolLM2 / TinyLlama style: GQA, tied embeddings
    "llama": ("llama", {"tie_word_embeddings": True}),
    # Llama 3.1 RoPE scaling (the frequency bands straddle head_dim 16's wavelengths), untied
    "llama3_rope": (
        "llama",
        {
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        },
    ),
    # linear RoPE scaling, plain multi-head attention, biased attention and MLP
    "llama_linear_rope": (
        "llama",
        {
            "num_key_value_heads": 4,
            "attention_bias": True,
            "mlp_bias": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        },
    ),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),  # q/k/v biases
    # q/k norms, head_dim not hidden/heads, MQA
    "qwen3": ("qwen3", {"head_dim": 32, "num_key_value_heads": 1, "tie_word_embeddings": False}),
    "mistral": ("mistral", {"sliding_window": SLIDING_WINDOW}),
    "phi3": ("phi3", {}),  # checkpoint holds fused qkv_proj / gate_up_proj
    "gemma": ("gemma", {"head_dim": 16, "num_key_value_heads": 1}),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 3.0,  # low caps, so the tanh actually bends the scores
            "final_logit_softcapping": 5.0,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {
            "head_dim": 16,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 24,
            "final_logit_softcapping": 5.0,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
        },
    ),
    # mixtures of experts: several experts, top-k > 1
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48}),
    # a gated shared expert, un-renormalised top-k weights, a dense layer between sparse ones
    "qwen2_moe": (
        "qwen2_moe",
        {
            "num_hidden_layers": 3,
            "mlp_only_layers": [1],
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": (
        "qwen3_moe",
        {
            "head_dim": 32,
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
        },
    ),
    # attention sinks, sliding/full layers, biased router and experts, a SwiGLU clamp that bites, YaRN
    "gpt_oss": (
        "gpt_oss",
        {
            "head_dim": 16,
            "num_hidden_layers": 3,
            "sliding_window": SLIDING_WINDOW,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 32,
            "swiglu_limit": 1.5,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    # multi-head latent attention, a dense first layer, grouped top-k routing, shared experts
    "deepseek_v3": (
        "deepseek_v3",
        {
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
            "first_k_dense_replace": 1,
            "n_routed_experts": 8,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "routed_scaling_factor": 2.5,
            "q_lora_rank": 48,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
        },
    ),
    # MLA without a query compression, softmax routing
    "deepseek_v2": (
        "deepseek_v2",
        {
            "num_key_value_heads": 4,
            "n_routed_experts": 6,
            "num_experts_per_tok": 2,
            "n_shared_experts": 2,
            "moe_intermediate_size": 32,
            "q_lora_rank": None,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 24,
        },
    ),
}

TINY_ARCHS: tuple[str, ...] = tuple(_ARCHS)
MOE_ARCHS: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "deepseek_v2")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_config(arch: str) -> PretrainedConfig:
    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    model_type, overrides = _ARCHS[arch]
    return AutoConfig.for_model(model_type, **{**_COMMON, **overrides})


def make_tiny_model(arch: str, path: Path, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Save a tiny random `arch` model (float32 safetensors) and, by default, a tokenizer to `path`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # the default init leaves norms at 1 (or 0 for Gemma) and biases at 0: make them matter
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek V3: changes which experts win
                buffer.add_(torch.randn_like(buffer) * 0.3)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if with_tokenizer:
        make_tiny_tokenizer().save_pretrained(path)
    return path


def make_tiny_tokenizer(specials: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0-255 are the bytes, then <s>, </s>, <pad>, the extra special tokens
    (`specials`: a chat format's markers), then filler tokens."""
    vocab = {char: byte for byte, char in _gpt2_byte_chars().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if specials:
        fast.add_tokens(list(specials), special_tokens=True)
    fast.add_tokens([f"<x{i}>" for i in range(VOCAB_SIZE - len(fast))])
    fast.chat_template = CHAT_TEMPLATE
    assert fast.convert_tokens_to_ids(["<s>", "</s>", "<pad>"]) == [BOS_ID, EOS_ID, PAD_ID]
    assert len(fast) == VOCAB_SIZE
    return fast


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer emits."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def load_reference_model(path: Path) -> PreTrainedModel:
    """The saved model in transformers, float32, eager attention (SDPA cannot soft-cap)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def reference_greedy(
    model: PreTrainedModel, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by full recomputation (no KV cache); returns the tokens and the logits
    [max_new_tokens, vocab] each was chosen from."""
    tokens = list(prompt)
    all_logits = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
        all_logits.append(logits)
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :], torch.stack(all_logits)


def assert_decodes_as_transformers(path: Path, prompts: list[list[int]], max_tokens: int = 6) -> None:
    """The engine's greedy tokens (CPU, float32, blocks of 4) equal transformers' full recomputation."""
    from pagoda import LLM, SamplingParams

    reference = load_reference_model(path)
    want = [reference_greedy(reference, p, max_tokens)[0] for p in prompts]
    llm = LLM(model=str(path), device="cpu", dtype="float32", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    assert got == want


def one_torch_thread() -> Iterator[None]:
    """Run a test module's tiny models on one torch thread (a module-scoped autouse fixture where used): on a
    few shared cores, idle OpenMP threads spinning make these tiny models tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
