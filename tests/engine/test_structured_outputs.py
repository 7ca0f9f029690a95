"""Structured outputs through the offline API: every output matches its schema / regex / choice, also when
the engine preempts, hits the prefix cache and chunks prefills (tiny random models, so only the grammar
keeps the text in shape; the checks are jsonschema and `re.fullmatch`, independent of llguidance)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from tiny_models import VOCAB_SIZE, make_tiny_model
from transformers import AutoTokenizer

from pagoda import LLM, SamplingParams
from pagoda.structured_outputs import StructuredOutputsParams
from pagoda.structured_outputs.backend import GrammarCompiler, GrammarError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{2,4}-[0-9]{3}( [xy]+)?"
CHOICES = ["yes", "no", "maybe so"]
PROMPTS = [[5 + i, 70, 80 + i] for i in range(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("so") / "llama")


def run(llm: LLM, spec: StructuredOutputsParams, **options: object) -> list[tuple[str, str | None]]:
    params = SamplingParams(structured_outputs=spec, **{"max_tokens": 120, **options})  # type: ignore[arg-type]
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(c.text, c.finish_reason) for o in outputs for c in o.outputs]


def test_json_regex_choice_always_match(model_dir: Path) -> None:
    llm = LLM(model=str(model_dir), block_size=4, max_model_len=256)
    for text, finish in run(llm, StructuredOutputsParams(json=SCHEMA), n=2, seed=3):
        assert finish == "stop"  # EOS only once the grammar accepts
        jsonschema.validate(json.loads(text), SCHEMA)
    for text, finish in run(llm, StructuredOutputsParams(regex=REGEX), temperature=1.5):
        assert finish == "stop" and re.fullmatch(REGEX, text), text
    for text, finish in run(llm, StructuredOutputsParams(regex=REGEX), top_k=20, top_p=0.9, seed=2):
        assert finish == "stop" and re.fullmatch(REGEX, text), text  # masked before the draw
    texts = run(llm, StructuredOutputsParams(choice=CHOICES), n=3, temperature=1.0)
    assert all(finish == "stop" and text in CHOICES for text, finish in texts)
    # a JSON object of any shape
    for text, _ in run(llm, StructuredOutputsParams(json_object=True), temperature=0.0, max_tokens=60):
        assert text.startswith("{")
    grammar = 'start: "(" item ("," item)* ")"\nitem: /[0-9]/'
    for text, finish in run(llm, StructuredOutputsParams(grammar=grammar), seed=1):
        assert finish == "length" or re.fullmatch(r"\([0-9](,[0-9])*\)", text), text


def test_choices_match_exactly_whatever_characters_they_hold(model_dir: Path) -> None:
    # choices are compiled as one regex of escaped literals: each must match itself and nothing else
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    compiler = GrammarCompiler(tokenizer, VOCAB_SIZE, [tokenizer.eos_token_id])
    choices = ["a.b", "(x)|/y\\", "tab\there", "<>", "new\nline", "[a-z]{2}", "^$", "#&-~", '"q"', "\x00"]
    spec = StructuredOutputsParams(choice=choices)
    for text in [*choices, "aXb", "a", "ab", "tab here", "x", "zz", "", "\\"]:
        matcher = compiler.matcher(spec)
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert (all(matcher.consume(t) for t in ids) and matcher.accepting) == (text in choices), text


def test_checking_the_draw_equals_masking_first(model_dir: Path) -> None:
    """Greedy rows draw first and mask only when the grammar rejects the token; top_k = the whole
    vocabulary changes nothing in the distribution but makes the sampler mask before drawing."""
    llm = LLM(model=str(model_dir), block_size=4, max_model_len=256)
    spec = StructuredOutputsParams(json=SCHEMA)
    assert run(llm, spec, temperature=0.0) == run(llm, spec, temperature=0.0, top_k=VOCAB_SIZE)


def test_preemption_prefix_hits_and_chunked_prefill_keep_the_grammar(model_dir: Path) -> None:
    spec = StructuredOutputsParams(json=SCHEMA)
    roomy = LLM(model=str(model_dir), block_size=4, max_model_len=160)
    want = run(roomy, spec, temperature=0.0)
    tight = LLM(
        model=str(model_dir), block_size=4, max_model_len=160, num_gpu_blocks_override=48,
        max_num_batched_tokens=6,
    )
    assert run(tight, spec, temperature=0.0) == want  # greedy: recomputed sequences resume their matcher
    assert tight.engine.get_stats().num_preemptions > 0
    assert run(tight, spec, temperature=0.0) == want  # again, now with prefix-cache hits
    assert tight.engine.get_stats().prefix_cache_hits > 0
    for text, finish in want:
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    assert tight.engine.get_stats().kv_cache_usage == 0.0


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutputsParams(json={"type": "objekt"}),
        StructuredOutputsParams(json="{not json"),
        StructuredOutputsParams(regex="a(b"),
        StructuredOutputsParams(grammar="start: undefined_rule"),
    ],
)
def test_invalid_specs_are_rejected_before_generation(model_dir: Path, spec: StructuredOutputsParams) -> None:
    llm = LLM(model=str(model_dir), block_size=4, max_model_len=64)
    with pytest.raises(GrammarError):
        llm.generate([[5, 6]], SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_params_take_exactly_one_constraint() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
