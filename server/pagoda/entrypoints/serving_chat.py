"""/v1/chat/completions: the model's chat template, then one engine request with n samples."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from pagoda.engine.async_engine import EngineDeadError, RequestAbortedError, RequestStream
from pagoda.entrypoints.chat_output import ChatDeltas, ChatOutputParser
from pagoda.entrypoints.constraints import ToolOptions, plan_chat
from pagoda.entrypoints.errors import OpenAIError
from pagoda.entrypoints.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatLogprobsContent,
    ChatResponseMessage,
    UsageInfo,
    random_id,
)
from pagoda.entrypoints.serving_engine import SSE_DONE, ServingEngine, sse, sse_chunk, sse_error
from pagoda.outputs import CompletionOutput, RequestOutput


class ServingChat(ServingEngine):
    def __init__(self, *args: Any, tool_options: ToolOptions | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_options = tool_options or ToolOptions()

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Validate and submit; returns the response, or the SSE stream when streaming."""
        self.check_model(request.model)
        self.check_queue()
        plan = plan_chat(request, self.tool_options)
        prompt_ids = self.chat_prompt_ids(
            request.messages, request.add_generation_prompt, request.chat_template_kwargs, plan.tools
        )
        max_tokens = self.resolve_max_tokens(len(prompt_ids), request.requested_max_tokens)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = request.sampling_params(max_tokens, logprobs)
        if plan.constraint is not None:
            params = await self.constrain_to(plan.constraint, params)
        request_id = random_id("chatcmpl")
        stream = await self.submit(request_id, prompt_ids, params)
        if request.stream:
            return self._stream(request, request_id, stream, plan.parser)
        return await self._complete(request, request_id, stream, plan.parser)

    async def _complete(
        self, request: ChatCompletionRequest, request_id: str, stream: RequestStream, parser: ChatOutputParser
    ) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        try:
            async for output in self.outputs(stream):
                final = output
        except RequestAbortedError as error:
            raise OpenAIError(
                503, "the request was aborted: the server is shutting down", code="server_shutting_down"
            ) from error
        except EngineDeadError as error:
            raise OpenAIError(500, str(error), code="engine_dead") from error
        assert final is not None and final.finished
        choices = []
        for sample in final.outputs:
            message, finish_reason = parser.message(sample.text, sample.finish_reason)
            choices.append(
                ChatCompletionChoice(
                    index=sample.index,
                    message=ChatResponseMessage(**message),
                    logprobs=self._logprobs(request, sample, 0) if request.logprobs else None,
                    finish_reason=finish_reason,
                    stop_reason=sample.stop_reason,
                )
            )
        prompt_tokens = len(final.prompt_token_ids)
        completion_tokens = sum(len(s.token_ids) for s in final.outputs)
        usage = UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return ChatCompletionResponse(
            id=request_id, model=request.model or self.model_name, choices=choices, usage=usage
        )

    def _logprobs(self, request: ChatCompletionRequest, sample: CompletionOutput, start: int) -> ChatLogprobs:
        """OpenAI's chat logprobs for the sample's tokens[start:]."""
        k = request.top_logprobs or 0
        content = []
        for token_id, logprobs in zip(sample.token_ids[start:], (sample.logprobs or [])[start:]):
            token = self.token_text(token_id)
            tops = [
                ChatLogprob(token=self.token_text(t), logprob=lp, bytes=list(self.token_text(t).encode()))
                for t, lp in self.top_logprobs(logprobs, k)
            ]
            content.append(
                ChatLogprobsContent(
                    token=token, logprob=logprobs[token_id], bytes=list(token.encode()), top_logprobs=tops
                )
            )
        return ChatLogprobs(content=content)

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, stream: RequestStream, parser: ChatOutputParser
    ) -> AsyncIterator[str]:
        created = int(time.time())
        model = request.model or self.model_name
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        n = request.n
        sent_text, sent_tokens, done = [0] * n, [0] * n, [False] * n
        deltas = [ChatDeltas(parser) for _ in range(n)]
        prompt_tokens = completion_tokens = 0

        def chunk(
            index: int,
            delta: dict,
            logprobs: ChatLogprobs | None = None,
            finish: str | None = None,
            stop_reason: int | str | None = None,
        ) -> str:
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs.model_dump() if logprobs else None,
                "finish_reason": finish,
                "stop_reason": stop_reason,
            }
            return sse_chunk(request_id, "chat.completion.chunk", created, model, choice, include_usage)

        try:
            for index in range(n):  # OpenAI sends the role first, on its own
                yield chunk(index, {"role": "assistant", "content": ""})
            async for output in self.outputs(stream):
                prompt_tokens = len(output.prompt_token_ids)
                for sample in output.outputs:
                    i = sample.index
                    if done[i]:
                        continue
                    delta = sample.text[sent_text[i] :]
                    finished = sample.finish_reason is not None
                    if not delta and not finished:
                        continue  # the detokenizer holds text back (partial UTF-8, a possible stop string)
                    message_delta = deltas[i].delta(sample.text, finished)
                    if not message_delta and not finished:
                        continue  # the parser holds text back (a tool-call or reasoning tag may be starting)
                    logprobs = self._logprobs(request, sample, sent_tokens[i]) if request.logprobs else None
                    sent_text[i], sent_tokens[i] = len(sample.text), len(sample.token_ids)
                    if finished:
                        done[i] = True
                        completion_tokens += len(sample.token_ids)
                    yield chunk(
                        i,
                        message_delta,
                        logprobs,
                        deltas[i].finish_reason(sample.finish_reason),
                        sample.stop_reason,
                    )
            if include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield sse(
                    {
                        "id": request_id,
                        "object": "chat.completion.chunk",
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
            self.llm.abort_nowait(stream.request_id)  # no-op once finished
        yield SSE_DONE
