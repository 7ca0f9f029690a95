"""/v1/completions: one engine request per prompt, choices indexed prompt-major (prompt i, sample j)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from pagoda.entrypoints.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from pagoda.entrypoints.serving_engine import ChoiceState, ServingEngine
from pagoda.outputs import CompletionOutput, RequestOutput


class _Prompt:
    """One prompt of a completion request, tokenized."""

    def __init__(self, text: str | None, token_ids: list[int]) -> None:
        self.text = text
        self.token_ids = token_ids


class ServingCompletion(ServingEngine):
    object_name = "text_completion"

    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """Validate and submit every prompt; returns the response, or the SSE stream when streaming."""
        self.check_model(request.model)
        self.check_sampling(request)
        self.check_num_seqs(len(request.prompts) * request.n)
        prompts = [await self._tokenize(p) for p in request.prompts]
        max_tokens = [
            self.resolve_max_tokens(len(p.token_ids), request.max_tokens, "prompt") for p in prompts
        ]
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        echoed = [len(p.token_ids) if prompt_logprobs is not None else 0 for p in prompts]
        self.check_generated_tokens(request.n, max_tokens, echoed)
        params = [self.sampling_params(request, m, request.logprobs, prompt_logprobs) for m in max_tokens]
        params = [await self.constrain(request, p) for p in params]
        request_id = random_id("cmpl")
        streams = await self.submit_all(request_id, [p.token_ids for p in prompts], params)
        if request.stream:
            return self.stream(request, request_id, streams, sum(len(p.token_ids) for p in prompts))
        return self._response(request, request_id, prompts, await self.final_outputs(streams))

    async def _tokenize(self, prompt: str | list[int]) -> _Prompt:
        if isinstance(prompt, str):
            return _Prompt(prompt, await self.encode(prompt))
        self.check_token_ids(prompt, "prompt")
        return _Prompt(None, prompt)

    def _response(
        self, request: CompletionRequest, request_id: str, prompts: list[_Prompt], finals: list[RequestOutput]
    ) -> CompletionResponse:
        choices = []
        for p, (prompt, final) in enumerate(zip(prompts, finals)):
            for sample in final.outputs:
                text = sample.text
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs(
                        request.logprobs, prompt if request.echo else None, final, sample
                    )
                if request.echo:
                    text = self._prompt_text(prompt) + text
                choices.append(
                    CompletionChoice(
                        index=p * request.n + sample.index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=sample.finish_reason,
                        stop_reason=sample.stop_reason,
                    )
                )
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = sum(len(s.token_ids) for f in finals for s in f.outputs)
        usage = UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return CompletionResponse(
            id=request_id, model=request.model or self.model_name, choices=choices, usage=usage
        )

    def _prompt_text(self, prompt: _Prompt) -> str:
        return prompt.text if prompt.text is not None else self.decode(prompt.token_ids)

    def _logprobs(
        self,
        k: int,
        prompt: _Prompt | None,
        final: RequestOutput,
        sample: CompletionOutput,
        start: int = 0,
        text_offset: int = 0,
    ) -> CompletionLogprobs:
        """OpenAI's legacy logprobs (top k) for tokens[start:] of a sample, after the prompt's when given."""
        result = CompletionLogprobs()
        entries: list[tuple[int, dict[int, float] | None]] = []
        if prompt is not None:
            prompt_lps = final.prompt_logprobs or [None] * len(prompt.token_ids)
            entries += list(zip(prompt.token_ids, prompt_lps))
        entries += list(zip(sample.token_ids[start:], (sample.logprobs or [])[start:]))
        offset = text_offset
        for token_id, logprobs in entries:
            token = self.token_text(token_id)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if logprobs is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(logprobs.get(token_id))
            top: dict[str, float] = {}
            for t, lp in self.top_logprobs(logprobs, k):
                top.setdefault(self.token_text(t), lp)  # tokens that print alike keep the likelier one
            result.top_logprobs.append(top)
        return result

    # ---- the streaming hooks: the echoed prompt goes first; with logprobs it waits for the first output,
    # which carries the prompt's logprobs --------------------------------------------------------------

    def opening_choices(self, request: CompletionRequest, num_prompts: int) -> Iterator[dict[str, Any]]:
        if request.echo and request.logprobs is None:
            for p, prompt in enumerate(request.prompts):
                text = prompt if isinstance(prompt, str) else self.decode(prompt)
                for j in range(request.n):
                    yield _choice(p * request.n + j, text)

    def first_choice(
        self,
        request: CompletionRequest,
        prompt_index: int,
        output: RequestOutput,
        sample: CompletionOutput,
        state: ChoiceState,
    ) -> dict[str, Any] | None:
        if not request.echo or request.logprobs is None:
            return None
        prompt = request.prompts[prompt_index]
        tokenized = _Prompt(None, list(output.prompt_token_ids))
        prompt_logprobs = self._logprobs(
            request.logprobs, tokenized, output, sample, start=len(sample.token_ids)
        )
        state.text_offset = sum(len(t) for t in prompt_logprobs.tokens)
        text = prompt if isinstance(prompt, str) else self.decode(prompt)
        return _choice(prompt_index * request.n + sample.index, text, prompt_logprobs)

    def delta_choice(
        self,
        request: CompletionRequest,
        index: int,
        output: RequestOutput,
        sample: CompletionOutput,
        delta: str,
        state: ChoiceState,
    ) -> dict[str, Any]:
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._logprobs(
                request.logprobs, None, output, sample, state.sent_tokens, state.text_offset
            )
            state.text_offset += sum(len(t) for t in logprobs.tokens)
        return _choice(index, delta, logprobs, sample.finish_reason, sample.stop_reason)


def _choice(
    index: int,
    text: str,
    logprobs: CompletionLogprobs | None = None,
    finish: str | None = None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs.model_dump() if logprobs else None,
        "finish_reason": finish,
        "stop_reason": stop_reason,
    }
