"""The grammar library behind one small interface: compile a spec (cached), a matcher per sequence.

We use llguidance rather than xgrammar. Both install into our CPU environment without touching torch,
and vLLM ships both; llguidance wins here because it has no ahead-of-time grammar compilation (its lexer
and Earley parser build lazily, so a new JSON schema costs about a millisecond, not the tens to hundreds
of xgrammar's compile step), every step and the construction itself run on a fuel budget (`LLParserLimits`),
which gives the bounded compile time the API promises without a watchdog thread, and its wheel is one
self-contained Rust library (xgrammar pulls a TVM FFI runtime). It also takes JSON schemas, regexes,
Lark and llama.cpp's GBNF directly.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from functools import cached_property
from typing import TYPE_CHECKING, Any

import llguidance
import torch

from pagoda.structured_outputs.params import StructuredOutputsParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# the construction budget: llguidance spends "fuel" (about 50k units per ms) building a grammar's lexer; a
# schema that needs more is rejected instead of stalling the engine
LIMITS = llguidance.LLParserLimits(initial_lexer_fuel=5_000_000, verbose_errors=False)
CACHE_SIZE = 256
# JSON in one line with Python's separators: free whitespace lets a weak model pad forever between tokens
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "
}


class GrammarError(ValueError):
    """The spec is not a valid schema / regex / grammar, or is too large to build in bounded time."""


class Matcher:
    """One sequence's place in its grammar. Tokens go in as they are sampled; `rollback` undoes them."""

    __slots__ = ("_matcher", "vocab_size")

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size  # the width of its bitmask rows, in tokens

    def consume(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and an error state) if the grammar did not allow it."""
        return self._matcher.consume_token(token_id)

    def allows(self, token_id: int) -> bool:
        """Whether the grammar accepts this token next (the state does not change); about a microsecond,
        against the tenths of a millisecond of a full bitmask row."""
        return self._matcher.validate_tokens([token_id]) == 1

    def rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)

    @property
    def accepting(self) -> bool:
        """Whether the text so far is a complete match (so EOS may come now)."""
        return self._matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing more may follow: the grammar is complete (or the matcher failed, which masking prevents
        unless another constraint, such as min_tokens blocking EOS, overrode the mask)."""
        return self._matcher.is_stopped() or self._matcher.is_error()

    @property
    def failed(self) -> bool:
        return self._matcher.is_error()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """Builds grammars for one tokenizer and caches them by spec; thread-safe (the HTTP thread validates,
    the engine thread builds matchers)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.eos_token_ids = list(eos_token_ids)
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        # about a second for a large vocabulary, so built once, on first use; llguidance.hf imports
        # transformers (~1 s), which `pagoda serve` must not wait for before it is ready
        import llguidance.hf

        return llguidance.hf.from_tokenizer(
            self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
        )

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The pristine matcher of `spec`'s grammar (cached by spec); GrammarError if it is invalid."""
        key = spec.key
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        matcher = llguidance.LLMatcher(self.tokenizer, _grammar_text(spec), log_level=0, limits=LIMITS)
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        if _matches_nothing(matcher):
            # e.g. {"$ref": "#"}, `a: a`, [^\s\S]: served, it ended at once with "" as if that matched
            raise GrammarError("the constraint matches no text at all")
        with self._lock:
            self._cache[key] = matcher
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredOutputsParams) -> Matcher:
        """A fresh matcher for one sequence (a copy of the cached pristine one)."""
        return Matcher(self.compile(spec).deep_copy(), self.vocab_size)


def _matches_nothing(matcher: llguidance.LLMatcher) -> bool:
    """Whether a pristine matcher admits no text, not even the empty one: llguidance finds that out when it
    first computes the allowed tokens (a bitmask row, a fraction of a millisecond)."""
    if matcher.is_accepting():
        return False
    probe = matcher.deep_copy()
    probe.compute_bitmask()
    return probe.is_error()


def fill_bitmask(matchers: list[Matcher], bitmask: torch.Tensor) -> None:
    """Row i of `bitmask` (int32 [B, ceil(V / 32)] on the CPU) gets the tokens matchers[i] allows.

    One row after another: a row takes about 0.2 ms for a 49k vocabulary, and llguidance's thread-pool
    version (`LLExecutor`) measured 20-100x slower than this loop on a busy 2-core machine.
    """
    assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
    for row, matcher in enumerate(matchers):
        # what llguidance.torch.fill_next_token_bitmask does; importing that module compiles a function with
        # torch.compile at import time, which loads torch._dynamo: 3 s of every server's start-up
        view = bitmask[row]
        matcher._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())


def _grammar_text(spec: StructuredOutputsParams) -> str:
    try:
        if spec.json is not None:
            schema = json.loads(spec.json) if isinstance(spec.json, str) else spec.json
            if schema is True:
                schema = {}  # JSON Schema's `true`: any value
            if not isinstance(schema, dict):
                raise GrammarError("a JSON schema must be an object (or true)")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if spec.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if spec.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            # one regex, not llguidance's "choice" (a Lark rule of alternatives, whose build grows faster
            # than the number of choices: 100k took 17 s of CPU, past the compile timeout)
            return llguidance.LLMatcher.grammar_from_regex("|".join(map(_regex_literal, spec.choice)))
        assert spec.grammar is not None
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except GrammarError:
        raise
    except Exception as error:  # the spec is the client's: whatever its conversion trips over is its error
        raise GrammarError(_short(f"{type(error).__name__}: {error}")) from error


_REGEX_SPECIAL = frozenset("\\.+*?()|[]{}^$/")  # and "/", which ends the regex in the Lark grammar


def _regex_literal(text: str) -> str:
    """A regex (Rust's syntax, as llguidance reads it) that matches exactly `text`. Not every escape is
    valid there (`\\<` is a word boundary), so only metacharacters are escaped, and what is not printable
    is written by its code point."""
    return "".join(
        "\\" + c if c in _REGEX_SPECIAL else c if c.isprintable() else f"\\x{{{ord(c):x}}}" for c in text
    )


def _short(message: str) -> str:
    return message if len(message) < 500 else message[:500] + "..."
