"""Loading Hugging Face directories, checked against the transformers model and tokenizer that wrote them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pagoda.loader import open_checkpoint

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=20000.0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "<s>", "</s>", "hello", "world", "ünï", "<user>", "<assistant>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def assert_weights_equal(checkpoint_weights: dict[str, torch.Tensor], model: LlamaForCausalLM) -> None:
    expected = model.state_dict()
    assert sorted(checkpoint_weights) == sorted(expected)
    for name, tensor in checkpoint_weights.items():
        assert tensor.dtype == expected[name].dtype, name
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def config_fields(config: LlamaConfig) -> dict[str, object]:
    fields = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version"):
        fields.pop(volatile, None)
    return fields


@pytest.mark.parametrize("max_shard_size", [None, "20KB"], ids=["single-file", "sharded"])
def test_safetensors_directory_round_trips(tmp_path: Path, max_shard_size: str | None) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    sharded = (tmp_path / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_size is not None)

    checkpoint = open_checkpoint(str(tmp_path))

    assert type(checkpoint.config) is LlamaConfig
    assert checkpoint.config.architectures == ["LlamaForCausalLM"]
    assert config_fields(checkpoint.config) == config_fields(model.config)
    assert_weights_equal(dict(checkpoint.weights()), model)
    assert checkpoint.torch_dtype == torch.float32
    assert checkpoint.eos_token_ids == [2]
    for text in ("hello world", "ünï hello <unk>"):
        assert checkpoint.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "hello"}]
    assert checkpoint.chat_template == CHAT_TEMPLATE
    assert checkpoint.tokenizer.apply_chat_template(
        messages, tokenize=False
    ) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_generation_config_eos_ids_and_bfloat16(tmp_path: Path) -> None:
    model = tiny_llama(torch.bfloat16)
    model.generation_config.eos_token_id = [2, 5]
    model.save_pretrained(tmp_path)

    checkpoint = open_checkpoint(tmp_path)

    assert checkpoint.eos_token_ids == [2, 5]
    assert checkpoint.torch_dtype == torch.bfloat16
    assert_weights_equal(dict(checkpoint.weights()), model)
    assert checkpoint.tokenizer is None and checkpoint.chat_template is None


def test_pytorch_model_bin_fallback(tmp_path: Path) -> None:
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    checkpoint = open_checkpoint(str(tmp_path))

    assert_weights_equal(dict(checkpoint.weights()), model)


def test_config_without_dtype_takes_the_weights_dtype(tmp_path: Path) -> None:
    model = tiny_llama(torch.float16)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))

    assert open_checkpoint(tmp_path).torch_dtype == torch.float16


def test_missing_weights_and_shards_are_reported(tmp_path: Path) -> None:
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no weights"):
        open_checkpoint(tmp_path)

    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing"):
        open_checkpoint(tmp_path)


def test_dummy_load_format_needs_only_config_json(tmp_path: Path) -> None:
    # vLLM's --load-format dummy: random weights for a model whose checkpoint is not at hand
    from pagoda import LLM, SamplingParams

    tiny_llama().config.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    with pytest.raises(FileNotFoundError, match="has no weights"):
        open_checkpoint(tmp_path)
    llm = LLM(model=str(tmp_path), load_format="dummy", skip_tokenizer_init=True, device="cpu")
    params = list(llm.engine.runner.model.parameters())
    assert all(p.abs().max() <= 1e-3 for p in params)
    assert all(p.abs().max() > 0 for p in params)  # drawn, not left as allocated
    out = llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_dummy_load_format_refuses_a_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="dummy needs a Hugging Face model directory"):
        open_checkpoint(gguf, "dummy")
