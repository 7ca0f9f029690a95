"""Incremental detokenization and stop strings: the text a sequence streams, token by token.

Decoding one token on its own is wrong in general: a character may span several byte-level tokens, and
SentencePiece-style decoders drop the leading space of whatever they decode first. So, like vLLM, each
step decodes a short window of recent tokens twice, with and without the newest ones, and streams the
difference; a window whose text ends in U+FFFD is an incomplete character, and waits for its last bytes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# prompt tokens decoded in front of the first generated token, so it renders as it would mid-text (vLLM's)
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text deltas.

    Invariant: the text of tokens[prefix_offset:read_offset] has been streamed; tokens from read_offset on
    have not. The deltas concatenate to `tokenizer.decode(generated_ids)` once `flush` has run.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.backend_decode = backend_decode(tokenizer)
        # one callable with the options bound (passed by position: faster than by keyword), called for
        # every token of every running sequence
        decode, skip = self.backend_decode, skip_special_tokens
        self._decode: Callable[[list[int]], str] = (
            (lambda token_ids: decode(token_ids, skip)) if decode is not None else self._decode_with_tokenizer
        )
        self._token_texts = single_token_texts(tokenizer, skip_special_tokens)
        # two extra prompt tokens in case some of them are special tokens that decode to nothing
        self.token_ids = list(prompt_token_ids[-(PROMPT_CONTEXT_TOKENS + 2) :])
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(self.read_offset - PROMPT_CONTEXT_TOKENS, 0)

    def append(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the text they complete (maybe empty)."""
        if len(token_ids) == 1:  # a decode step's one token, for every running sequence
            return self._append_one(token_ids[0])
        return "".join(self._append_one(token_id) for token_id in token_ids)

    def flush(self) -> str:
        """At the end: release any text held back for an incomplete character (as U+FFFD, like decode)."""
        return self._advance(force=True)

    def _append_one(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        return self._advance(force=False)

    def _advance(self, force: bool) -> str:
        """Decode the window with and without the tokens not yet streamed; stream the difference unless it
        is empty or ends in an incomplete character (`force`: stream it anyway)."""
        window = self.token_ids[self.prefix_offset :]
        num_streamed = self.read_offset - self.prefix_offset
        if num_streamed == 1:  # most steps: the streamed part of the window is the previous token alone
            prefix_text = self._token_texts.get(window[0])
            if prefix_text is None:
                prefix_text = self._token_texts[window[0]] = self._decode(window[:1])
        else:
            prefix_text = self._decode(window[:num_streamed])
        new_text = self._decode(window)
        if not force and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text) :]


    def _decode_with_tokenizer(self, token_ids: list[int]) -> str:
        # no clean-up of tokenization spaces: it rewrites text across token boundaries ("a ." -> "a."),
        # so a window's text would stop being a prefix of the next window's
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )


# per tokenizer and skip_special_tokens, the text of each token decoded alone (it never changes), as the
# detokenizers of all sequences look it up: one decode per token and step instead of two
_TOKEN_TEXTS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[bool, dict[int, str]]] = (
    weakref.WeakKeyDictionary()
)


def single_token_texts(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool) -> dict[int, str]:
    """The shared {token id: text of the token alone} of a tokenizer and skip_special_tokens (filled by its
    detokenizers, at most one entry per token of the vocabulary)."""
    return _TOKEN_TEXTS.setdefault(tokenizer, {}).setdefault(skip_special_tokens, {})


def backend_decode(tokenizer: PreTrainedTokenizerBase) -> Callable[..., str] | None:
    """A fast tokenizer's own (Rust) decode, where transformers' `decode` adds nothing to it but argument
    conversions (without clean-up of tokenization spaces), which cost most of the time of decoding a few
    tokens: several microseconds, twice per token of every running sequence. None for other tokenizers,
    and for classes that decode their own way (Whisper's, for one)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast
    if not isinstance(tokenizer, fast):
        return None
    if type(tokenizer).decode is not fast.decode or type(tokenizer)._decode is not fast._decode:
        return None
    decode: Callable[..., str] = tokenizer.backend_tokenizer.decode
    return decode


class StopStrings:
    """Finds stop strings in a growing text, and how much of its tail could still become one."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.max_len = max((len(s) for s in self.stop), default=0)

    def find(self, text: str, num_new_chars: int) -> tuple[int, str] | None:
        """The earliest stop string that ends within the last `num_new_chars` characters of `text`, as
        (index where it starts, the string); on a tie, the one listed first."""
        if not self.stop or not num_new_chars:
            return None
        # a match ending in the new text starts at most max_len - 1 characters before it
        start = max(len(text) - num_new_chars - self.max_len + 1, 0)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def partial_match_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of some stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class TextDelta(NamedTuple):
    text: str  # new text that is safe to stream
    stopped: bool  # a stop string ended the sequence
    stop_string: str | None  # which one


class SequenceDetokenizer:
    """One sequence's output text: detokenizes new tokens, ends at the first stop string (cut off before
    it, like vLLM and OpenAI) and holds back any tail that could still grow into one, so a stop string never
    reaches a stream.

    The engine should not pass the token that ends a sequence (EOS, a stop token id) when that token is
    not meant to show in the text; with skip_special_tokens it decodes to nothing anyway.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.stop_strings = StopStrings(params.stop)
        self.output_text = ""  # all text so far, cut before the stop string once one matched
        self.num_emitted = 0  # how many characters of output_text have been streamed
        self.num_tokens = 0  # how many generated tokens it has been given

    @property
    def text(self) -> str:
        """The text streamed so far: cumulative output for a response that is still running."""
        return self.output_text[: self.num_emitted]

    def update(self, token_ids: list[int], finished: bool = False) -> TextDelta:
        """Add the step's new tokens. `finished` (length, EOS, abort) releases all held-back text."""
        self.num_tokens += len(token_ids)
        new_text = self.detokenizer.append(token_ids)
        if finished:
            new_text += self.detokenizer.flush()
        self.output_text += new_text
        if not self.stop_strings.stop:  # nothing to find or hold back: all the text streams
            self.num_emitted = len(self.output_text)
            return TextDelta(new_text, False, None)
        match = self.stop_strings.find(self.output_text, len(new_text))
        if match is not None:
            index, stop = match
            self.output_text = self.output_text[:index]
            return TextDelta(self._emit_up_to(index), True, stop)
        held_back = 0 if finished else self.stop_strings.partial_match_length(self.output_text)
        return TextDelta(self._emit_up_to(len(self.output_text) - held_back), False, None)

    def _emit_up_to(self, end: int) -> str:
        delta = self.output_text[self.num_emitted : end]
        self.num_emitted = max(end, self.num_emitted)
        return delta
