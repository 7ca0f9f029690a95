"""A fast tokenizer rebuilt from GGUF metadata.

Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM, Llama 3, Qwen) are built here
directly as a `tokenizers.Tokenizer` in a fraction of a second, splitting text the way llama.cpp does
for the file's `tokenizer.ggml.pre`. SentencePiece-style vocabularies (`llama`: Gemma, Phi-3, Llama 2)
go through transformers' own GGUF converter, which is slower but knows their quirks.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from pagoda.loader.gguf_reader import GGUFFile

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# llama.cpp's token types (llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns of the pre-tokenizer families llama.cpp knows (llama-vocab.cpp), by tokenizer.ggml.pre
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "megrez"}
_DIGIT_ISOLATING_PRE = {"smollm", "starcoder", "refact"}  # GPT-2 split after cutting out each digit
_GPT2_PRE = {"gpt-2", "default", "gpt2"}

# Texts of control tokens that end a turn, which llama.cpp treats as end-of-generation (llama-vocab.cpp)
_END_OF_GENERATION_TEXTS = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
    "<|return|>",
    "<|call|>",
}


def tokenizer_from_gguf(file: GGUFFile) -> PreTrainedTokenizerBase | None:
    """The file's tokenizer with its chat template set, or None when the metadata holds no vocabulary."""
    meta = file.metadata
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        return None
    if model == "gpt2":
        tokenizer = _byte_level_bpe_tokenizer(file)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(file.path.parent, gguf_file=file.path.name)
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def eos_token_ids_from_gguf(file: GGUFFile) -> list[int]:
    """The EOS id first, then every other token llama.cpp would stop generation at."""
    meta = file.metadata
    ids = [
        int(meta[key])
        for key in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        if key in meta
    ]
    tokens = meta.get("tokenizer.ggml.tokens", [])
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        for token_id in np.flatnonzero(np.asarray(types) == _CONTROL):
            if tokens[token_id] in _END_OF_GENERATION_TEXTS:
                ids.append(int(token_id))
    return list(dict.fromkeys(ids))


def _byte_level_bpe_tokenizer(file: GGUFFile) -> PreTrainedTokenizerFast:
    meta = file.metadata
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    types = np.asarray(types) if types is not None else np.ones(len(tokens), dtype=np.int32)
    pre = meta.get("tokenizer.ggml.pre", "default")

    vocab = _byte_level_vocab(tokens, types)
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    # Llama 3's own tokenizer.json (and llama.cpp for it) takes a word found whole in the vocabulary as is
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _LLAMA3_PRE)
    )
    backend.pre_tokenizer = _pre_tokenizer(pre)
    if pre in _QWEN2_PRE:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in np.flatnonzero(types == _CONTROL)]
    )
    backend.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == _USER_DEFINED)
        ]
    )

    special = {
        name: _token_text(file, key)
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
    }
    backend.post_processor = _bos_eos_template(
        backend,
        special["bos_token"] if meta.get("tokenizer.ggml.add_bos_token", False) else None,
        special["eos_token"] if meta.get("tokenizer.ggml.add_eos_token", False) else None,
    )
    context_length = meta.get(f"{file.architecture}.context_length")
    from transformers import PreTrainedTokenizerFast  # the wrapper only: the backend is built above

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        model_max_length=int(context_length) if context_length is not None else int(1e30),
        **{name: text for name, text in special.items() if text is not None},
    )


def _byte_level_vocab(tokens: list[str], types: np.ndarray) -> dict[str, int]:
    """Token text -> id. Ordinary tokens are spelled in GPT-2's byte alphabet; a few files write some in
    plain UTF-8 instead, so respell those. Control and user-defined tokens stay literal: they are
    matched whole in the text, never built from bytes."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if types[token_id] not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, token_id)
    return vocab


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as a printable character (the printable Latin-1 ones as
    themselves, the others from U+0100 on), as transformers' and OpenAI's `bytes_to_unicode`."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_ISOLATING_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in _GPT2_PRE:
        logger.warning("GGUF pre-tokenizer %r is unknown; splitting text like GPT-2", pre)
    return byte_level


def _token_text(file: GGUFFile, id_key: str) -> str | None:
    token_id = file.metadata.get(f"tokenizer.ggml.{id_key}")
    tokens = file.metadata["tokenizer.ggml.tokens"]
    return tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None


def _bos_eos_template(backend: Tokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    single = " ".join([*(["$A"] if bos is None else [bos, "$A"]), *([] if eos is None else [eos])])
    pair = (
        single
        + " "
        + " ".join(
            [*(["$B:1"] if bos is None else [f"{bos}:1", "$B:1"]), *([] if eos is None else [f"{eos}:1"])]
        )
    )
    special_tokens = [(text, backend.token_to_id(text)) for text in (bos, eos) if text is not None]
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(special_tokens))
    )
