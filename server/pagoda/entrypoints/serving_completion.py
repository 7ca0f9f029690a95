"""/v1/completions: one engine request per prompt, choices indexed prompt-major (prompt i, sample j)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from pagoda.engine.async_engine import EngineDeadError, RequestAbortedError, RequestStream
from pagoda.entrypoints.errors import OpenAIError
from pagoda.entrypoints.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from pagoda.entrypoints.serving_engine import SSE_DONE, ServingEngine, sse, sse_chunk, sse_error
from pagoda.outputs import CompletionOutput, RequestOutput


class _Prompt:
    """One prompt of a completion request, tokenized."""

    def __init__(self, text: str | None, token_ids: list[int]) -> None:
        self.text = text
        self.token_ids = token_ids


class ServingCompletion(ServingEngine):
    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """Validate and submit every prompt; returns the response, or the SSE stream when streaming."""
        self.check_model(request.model)
        self.check_queue()
        prompts = [self._tokenize(p) for p in request.prompts]
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        params = [
            request.sampling_params(
                self.resolve_max_tokens(len(p.token_ids), request.max_tokens),
                request.logprobs,
                prompt_logprobs,
            )
            for p in prompts
        ]
        params = [await self.constrain(request, p) for p in params]
        request_id = random_id("cmpl")
        streams: list[RequestStream] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                streams.append(await self.submit(f"{request_id}-{i}", prompt.token_ids, p))
        except BaseException:
            for stream in streams:
                self.llm.abort_nowait(stream.request_id)
            raise
        if request.stream:
            return self._stream(request, request_id, prompts, streams)
        return await self._complete(request, request_id, prompts, streams)

    def _tokenize(self, prompt: str | list[int]) -> _Prompt:
        if isinstance(prompt, str):
            return _Prompt(prompt, self.encode(prompt))
        self.check_token_ids(prompt, "prompt")
        return _Prompt(None, prompt)

    async def _final_output(self, stream: RequestStream) -> RequestOutput:
        last: RequestOutput | None = None
        async for output in self.outputs(stream):
            last = output
        assert last is not None and last.finished
        return last

    async def _complete(
        self,
        request: CompletionRequest,
        request_id: str,
        prompts: list[_Prompt],
        streams: list[RequestStream],
    ) -> CompletionResponse:
        tasks = [asyncio.ensure_future(self._final_output(s)) for s in streams]
        try:
            finals = await asyncio.gather(*tasks)
        except RequestAbortedError as error:
            raise OpenAIError(
                503, "the request was aborted: the server is shutting down", code="server_shutting_down"
            ) from error
        except EngineDeadError as error:
            raise OpenAIError(500, str(error), code="engine_dead") from error
        finally:
            for task in tasks:  # a failure (or the client leaving) ends the siblings too
                task.cancel()
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

    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        prompts: list[_Prompt],
        streams: list[RequestStream],
    ) -> AsyncIterator[str]:
        created = int(time.time())
        model = request.model or self.model_name
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        n = request.n
        sent_text = [0] * (len(prompts) * n)
        sent_tokens = [0] * (len(prompts) * n)
        offsets = [0] * (len(prompts) * n)  # text offset of the next token, for logprobs
        done = [False] * (len(prompts) * n)
        completion_tokens = 0

        def chunk(
            index: int,
            text: str,
            logprobs: CompletionLogprobs | None,
            finish: str | None,
            stop_reason: int | str | None = None,
        ) -> str:
            choice = {
                "index": index,
                "text": text,
                "logprobs": logprobs.model_dump() if logprobs else None,
                "finish_reason": finish,
                "stop_reason": stop_reason,
            }
            return sse_chunk(request_id, "text_completion", created, model, choice, include_usage)

        # the echoed prompt goes first; with logprobs it waits for the first output, which carries the
        # prompt's logprobs
        echo_pending = [request.echo] * (len(prompts) * n)
        try:
            if request.echo and request.logprobs is None:
                for p, prompt in enumerate(prompts):
                    for j in range(n):
                        echo_pending[p * n + j] = False
                        yield chunk(p * n + j, self._prompt_text(prompt), None, None)
            async for p, output in _merge(self, streams):
                for sample in output.outputs:
                    i = p * n + sample.index
                    if echo_pending[i]:
                        echo_pending[i] = False
                        prompt_logprobs = self._logprobs(
                            request.logprobs, prompts[p], output, sample, start=len(sample.token_ids)
                        )
                        offsets[i] = sum(len(t) for t in prompt_logprobs.tokens)
                        yield chunk(i, self._prompt_text(prompts[p]), prompt_logprobs, None)
                    if done[i]:
                        continue
                    delta = sample.text[sent_text[i] :]
                    finished = sample.finish_reason is not None
                    if not delta and not finished:
                        continue
                    logprobs = None
                    if request.logprobs is not None:
                        logprobs = self._logprobs(
                            request.logprobs, None, output, sample, sent_tokens[i], offsets[i]
                        )
                        offsets[i] += sum(len(t) for t in logprobs.tokens)
                    sent_text[i] = len(sample.text)
                    sent_tokens[i] = len(sample.token_ids)
                    if finished:
                        done[i] = True
                        completion_tokens += len(sample.token_ids)
                    yield chunk(i, delta, logprobs, sample.finish_reason, sample.stop_reason)
            if include_usage:
                prompt_tokens = sum(len(p.token_ids) for p in prompts)
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield sse(
                    {
                        "id": request_id,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
        except RequestAbortedError:
            yield sse_error(503, "the request was aborted: the server is shutting down")
        except EngineDeadError as error:
            yield sse_error(500, str(error))
        finally:
            for stream in streams:
                self.llm.abort_nowait(stream.request_id)  # no-op once finished
        yield SSE_DONE


async def _merge(
    serving: ServingEngine, streams: list[RequestStream]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the prompt index."""
    if len(streams) == 1:
        async for output in serving.outputs(streams[0]):
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in serving.outputs(stream):
                queue.put_nowait((index, output))
            queue.put_nowait((index, None))
        except Exception as error:
            queue.put_nowait((index, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
