"""Our models, fed flat paged batches, against Hugging Face transformers run on each prompt alone.

Each architecture's tiny random checkpoint is loaded from its safetensors file into our model. Several
prompts of different lengths prefill together in one flat batch, then decode together; a late prompt
arrives in two prefill chunks mixed with the others' decodes. Blocks are 4 tokens, handed out in
shuffled order, so every sequence spans several non-contiguous blocks. Greedy tokens must be equal and
logits close to transformers' full recomputation.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import load_file
from tiny_models import (
    BOS_ID,
    SLIDING_WINDOW,
    TINY_ARCHS,
    VOCAB_SIZE,
    load_reference_model,
    make_tiny_model,
    reference_greedy,
    tiny_config,
)
from torch import nn
from transformers import AutoConfig, GPT2Config, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagoda.attention.metadata import AttentionMetadata, attention_metadata
from pagoda.layers.attention import Attention
from pagoda.layers.rotary import RopeConfig
from pagoda.models import ModelSpec, build_model

BLOCK_SIZE = 4
NUM_BLOCKS = 48


class PagedRunner:
    """A minimal stand-in for the engine: block tables, slot mapping and metadata for flat batches."""

    def __init__(self, model: nn.Module, spec: ModelSpec, seed: int) -> None:
        self.model = model
        for module in model.modules():
            if isinstance(module, Attention):
                shape = (NUM_BLOCKS, BLOCK_SIZE, module.num_kv_heads, module.head_dim)
                module.k_cache = torch.zeros(shape)
                module.v_cache = module.k_cache if module.values_in_keys else torch.zeros(shape)
        self.free_blocks = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free_blocks)
        self.tokens: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}
        self.block_tables: dict[str, list[int]] = {}

    def add(self, seq: str, prompt: list[int]) -> None:
        self.tokens[seq], self.num_computed[seq], self.block_tables[seq] = list(prompt), 0, []

    @torch.no_grad()
    def step(self, schedule: dict[str, int]) -> dict[str, torch.Tensor]:
        """Run `schedule[seq]` new tokens of each sequence as one flat batch; returns each sequence's
        logits at its last new token."""
        input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for seq, count in schedule.items():
            start = self.num_computed[seq]
            stop = start + count
            table = self.block_tables[seq]
            while len(table) * BLOCK_SIZE < stop:
                table.append(self.free_blocks.pop())
            input_ids += self.tokens[seq][start:stop]
            positions += range(start, stop)
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, stop)]
            query_lens.append(count)
            seq_lens.append(stop)
            self.num_computed[seq] = stop
        tables = [self.block_tables[seq] for seq in schedule]
        width = max(len(t) for t in tables)
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(
                [0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32
            ),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        with attention_metadata(md):
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions))
        last_rows = torch.tensor(query_lens).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[last_rows])
        assert logits.dtype == torch.float32 and logits.shape == (len(schedule), VOCAB_SIZE)
        return dict(zip(schedule, logits))

    def append(self, seq: str, token: int) -> None:
        self.tokens[seq].append(token)


def load_our_model(path: Path) -> tuple[nn.Module, ModelSpec]:
    hf_config = AutoConfig.from_pretrained(path)
    model = build_model(hf_config, torch.float32, torch.device("cpu"))
    model.load_weights(load_file(path / "model.safetensors").items())
    return model, ModelSpec.from_hf_config(hf_config)


one_torch_thread = pytest.fixture(autouse=True, scope="module")(tiny_models.one_torch_thread)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_paged_batches_match_transformers(arch: str, tiny_dir: Path) -> None:
    path = make_tiny_model(arch, tiny_dir / arch, with_tokenizer=False)
    reference = load_reference_model(path)
    model, spec = load_our_model(path)
    rng = random.Random(arch)
    prompts = {
        name: [rng.randrange(VOCAB_SIZE) for _ in range(length)]
        for name, length in {"a": 11, "b": 3, "c": 17, "d": 1, "late": 13}.items()
    }
    num_new = 6
    expected = {name: reference_greedy(reference, prompt, num_new) for name, prompt in prompts.items()}
    got_tokens: dict[str, list[int]] = {name: [] for name in prompts}
    got_logits: dict[str, list[torch.Tensor]] = {name: [] for name in prompts}

    runner = PagedRunner(model, spec, seed=len(arch))
    for name in "abcd":
        runner.add(name, prompts[name])
    runner.add("late", prompts["late"])

    def run(schedule: dict[str, int]) -> None:
        for name, logits in runner.step(schedule).items():
            if runner.num_computed[name] == len(runner.tokens[name]):  # not mid-prompt
                got_tokens[name].append(int(logits.argmax()))
                got_logits[name].append(logits)
                runner.append(name, got_tokens[name][-1])

    run({"a": 11, "b": 3, "c": 17, "d": 1})  # all prefills in one batch
    run({"a": 1, "b": 1, "c": 1, "d": 1})  # decodes only
    run({"a": 1, "late": 6, "b": 1, "c": 1, "d": 1})  # a first prefill chunk among decodes
    run({"a": 1, "b": 1, "late": 7, "c": 1, "d": 1})  # the last chunk: "late" samples its first token
    while unfinished := [name for name in ("late", *"abcd") if len(got_tokens[name]) < num_new]:
        run(dict.fromkeys(unfinished, 1))

    for name, (tokens, logits) in expected.items():
        assert got_tokens[name] == tokens, f"{arch}: sequence {name!r} diverged from transformers"
        torch.testing.assert_close(torch.stack(got_logits[name]), logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
def test_sliding_windows_and_softcaps_are_read_from_the_config(arch: str) -> None:
    spec = ModelSpec.from_hf_config(tiny_config(arch))
    if arch == "mistral":
        assert spec.sliding_windows == (SLIDING_WINDOW, SLIDING_WINDOW)
    else:
        assert spec.sliding_windows == (SLIDING_WINDOW, None)
        assert spec.attention_scale == 24**-0.5
        assert spec.final_logit_softcap == 5.0
    # transformers applies Gemma 2's attention soft-cap, and not Gemma 3's
    assert spec.attn_logit_softcap == (3.0 if arch == "gemma2" else None)


def test_spec_gives_the_kv_cache_geometry() -> None:
    spec = ModelSpec.from_hf_config(tiny_config("qwen3"))
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, 1, 32)
    assert (spec.vocab_size, spec.max_position_embeddings) == (VOCAB_SIZE, 256)
    assert spec.sliding_windows == (None, None)


def test_gemma3_sliding_layers_use_their_own_rope() -> None:
    spec = ModelSpec.from_hf_config(tiny_config("gemma3"))
    assert spec.ropes[0] == RopeConfig(theta=10000.0, rotary_dim=16)
    assert spec.ropes[1] == RopeConfig(theta=1000000.0, rotary_dim=16, scaling="linear", factor=8.0)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        # gpt-oss's YaRN, and DeepSeek's with mscale (its attention factor is a ratio of two)
        {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 4096,
        },
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
        },
    ],
)
def test_rope_frequencies_match_transformers(rope_parameters: dict) -> None:
    cfg = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=16,
        max_position_embeddings=131072,
        rope_parameters=rope_parameters,
    )
    expected, attention_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")
    rope = ModelSpec.from_hf_config(cfg).ropes[0]
    assert rope.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    torch.testing.assert_close(rope.inv_freq(), expected, atol=0, rtol=1e-6)


def test_transformers_4_rope_spelling_is_understood() -> None:
    cfg = LlamaConfig(num_hidden_layers=1)
    del cfg.rope_parameters
    cfg.rope_theta = 500000.0
    cfg.rope_scaling = {"type": "linear", "factor": 2.0}
    assert ModelSpec.from_hf_config(cfg).ropes[0] == RopeConfig(
        theta=500000.0, rotary_dim=cfg.head_dim, scaling="linear", factor=2.0
    )


def test_unsupported_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported model architecture 'GPT2LMHeadModel'"):
        build_model(GPT2Config(architectures=["GPT2LMHeadModel"]), torch.float32, torch.device("cpu"))


def test_unsupported_rope_scaling_is_a_clear_error() -> None:
    cfg = LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported rope scaling 'dynamic'"):
        ModelSpec.from_hf_config(cfg)


def test_missing_and_unknown_checkpoint_weights_are_errors(tiny_dir: Path) -> None:
    path = make_tiny_model("qwen2", tiny_dir / "qwen2-broken", with_tokenizer=False)
    model = build_model(AutoConfig.from_pretrained(path), torch.float32, torch.device("cpu"))
    weights = load_file(path / "model.safetensors")
    without_k = {name: w for name, w in weights.items() if name != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.bias"):
        model.load_weights(without_k.items())
    with pytest.raises(KeyError, match="model.layers.0.mlp.extra.weight"):
        model.load_weights([*weights.items(), ("model.layers.0.mlp.extra.weight", torch.zeros(1))])


def test_build_model_allocates_in_the_requested_dtype() -> None:
    model = build_model(tiny_config("gemma2"), torch.bfloat16, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    # RoPE frequencies stay float32 whatever the weights' dtype
    assert {b.dtype for b in model.buffers()} == {torch.float32}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_llm_generate_greedy_matches_transformers(arch: str, tiny_dir: Path) -> None:
    """Through the whole engine: scheduler, block manager, model runner, sampler."""
    from pagoda import LLM, SamplingParams

    path = make_tiny_model(arch, tiny_dir / f"{arch}-llm")
    rng = random.Random(7)
    prompts = [[rng.randrange(BOS_ID) for _ in range(n)] for n in (9, 2, 23, 14)]
    num_new = 8
    llm = LLM(model=str(path), block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)
    outputs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=num_new, ignore_eos=True), use_tqdm=False
    )
    reference = load_reference_model(path)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == reference_greedy(reference, prompt, num_new)[0]
