"""A request: its n sequences, their text, stop conditions and timings."""

from __future__ import annotations

from typing import Any

from pagoda.engine.detokenizer import SequenceDetokenizer
from pagoda.engine.sequence import Sequence
from pagoda.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagoda.sampling_params import RequestOutputKind


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        seqs: list[Sequence],
        tokenizer: Any,
        eos_token_ids: list[int],
        arrival_time: float,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.seqs = seqs
        self.prompt_token_ids = seqs[0].prompt_token_ids  # every sample's; a copy made once
        self.eos_token_ids = set(eos_token_ids)
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.detokenizers = [
            SequenceDetokenizer(tokenizer, s.prompt_token_ids, s.params)
            if tokenizer is not None and s.params.detokenize
            else None
            for s in seqs
        ]
        self._new_tokens = [0] * len(seqs)
        # every step's tokens make an output, or only the last ones (FINAL_ONLY, as LLM.generate asks)
        self.streams = seqs[0].params.output_kind != RequestOutputKind.FINAL_ONLY
        # Without stop strings the text decides nothing, and a FINAL_ONLY request shows it only at the end:
        # its tokens are detokenized then, in one go (the same calls in the same order, the same text),
        # which keeps them off the per-token path of every step.
        self.text_at_end = not self.streams and not seqs[0].params.stop

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def wants_output(self) -> bool:
        """Whether this step's tokens make an output: every step, or only the last (FINAL_ONLY)."""
        return self.streams or self.finished

    def append_token(
        self, seq: Sequence, token_id: int, logprobs: dict[int, float] | None, now: float
    ) -> str | None:
        """Record a sampled token; return the finish reason if it ends the sequence."""
        seq.append_token(token_id)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        self._new_tokens[seq.index] += 1
        metrics = self.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        params = seq.params
        reason: str | None = None
        if params.stop_token_ids and token_id in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token_id
        elif token_id in self.eos_token_ids and not params.ignore_eos:
            reason = "stop"
        elif seq.matcher is not None and seq.matcher.finished:
            reason = "stop"  # structured outputs: the grammar admits nothing more
        elif params.max_tokens is not None and seq.num_completion_tokens >= params.max_tokens:
            reason = "length"
        detokenizer = self.detokenizers[seq.index]
        if detokenizer is not None and not self.text_at_end:
            delta = detokenizer.update([token_id], finished=reason is not None)
            if delta.stopped:
                reason, seq.stop_reason = "stop", delta.stop_string
        return reason

    def output(self) -> RequestOutput:
        """A cumulative snapshot; resets the per-step new-token counts."""
        finished = self.finished
        if finished:
            self.metrics.finished_time = self.metrics.last_token_time
        if self.text_at_end:
            self._catch_up_text()
        completions = [
            CompletionOutput(
                index=seq.index,
                text="" if detokenizer is None else detokenizer.text,
                token_ids=seq.completion_token_ids,  # a fresh list
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            )
            for seq, detokenizer in zip(self.seqs, self.detokenizers)
        ]
        first = self.seqs[0]
        new_counts, self._new_tokens = self._new_tokens, [0] * len(self.seqs)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=first.prompt_logprobs if first.params.prompt_logprobs is not None else None,
            num_cached_tokens=first.num_cached_tokens,
            metrics=self.metrics,
            new_token_counts=new_counts,
        )

    def _catch_up_text(self) -> None:
        """Detokenize the tokens held back for the end, as `append_token` would have one by one: a sequence
        that ended on a token of its own (a finish reason but "abort") releases its held-back text."""
        for seq, detokenizer in zip(self.seqs, self.detokenizers):
            if detokenizer is None:
                continue
            pending = seq.completion_token_ids[detokenizer.num_tokens :]
            if pending:
                ended = seq.finish_reason is not None and seq.finish_reason != "abort"
                detokenizer.update(pending, finished=ended)
