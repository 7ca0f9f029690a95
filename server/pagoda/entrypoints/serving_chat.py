"""/v1/chat/completions: the model's chat template, then one engine request with n samples."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from pagoda.entrypoints.chat_output import ChatDeltas
from pagoda.entrypoints.constraints import ToolOptions, plan_chat
from pagoda.entrypoints.errors import bad_request
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
from pagoda.entrypoints.serving_engine import ChoiceState, ServingEngine
from pagoda.outputs import CompletionOutput, RequestOutput

_READS_REASONING_EFFORT = re.compile(r"\breasoning_effort\b")


@dataclass
class ChatChoiceState(ChoiceState):
    deltas: ChatDeltas | None = None  # what of the parsed message (content, reasoning, tool calls) is sent


class ServingChat(ServingEngine):
    object_name = "chat.completion.chunk"

    def __init__(self, *args: Any, tool_options: ToolOptions | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_options = tool_options or ToolOptions()

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Validate and submit; returns the response, or the SSE stream when streaming."""
        self.check_model(request.model)
        self.check_sampling(request)
        self.check_num_seqs(request.n)
        plan = plan_chat(request, self.tool_options)
        prompt_ids = await self.chat_prompt_ids(
            request.messages,
            request.add_generation_prompt,
            self._template_kwargs(request),
            request.chat_template,
            plan.tools,
        )
        max_tokens = self.resolve_max_tokens(len(prompt_ids), request.requested_max_tokens, "messages")
        self.check_generated_tokens(request.n, [max_tokens])
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self.sampling_params(request, max_tokens, logprobs)
        if plan.parser.reads_special_tokens:  # the parser takes the markers out of what the client gets
            params = dataclasses.replace(params, skip_special_tokens=False)
        if plan.constraint is not None:
            params = await self.constrain_to(plan.constraint, params)
        request_id = random_id("chatcmpl")
        streams = await self.submit_all(request_id, [prompt_ids], [params])
        if request.stream:
            new_state = lambda: ChatChoiceState(deltas=ChatDeltas(plan.parser))
            return self.stream(request, request_id, streams, len(prompt_ids), new_state)
        (final,) = await self.final_outputs(streams)
        choices = []
        for sample in final.outputs:
            message, finish_reason = plan.parser.message(sample.text, sample.finish_reason)
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

    def _template_kwargs(self, request: ChatCompletionRequest) -> dict[str, Any] | None:
        """chat_template_kwargs, with reasoning_effort as the template variable of that name (what
        gpt-oss's template reads); a template that never mentions it could not honour it: 400."""
        if request.reasoning_effort is None:
            return request.chat_template_kwargs
        template = request.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not isinstance(template, str) or not _READS_REASONING_EFFORT.search(template):
            raise bad_request("this model's chat template takes no reasoning_effort", "reasoning_effort")
        return {**(request.chat_template_kwargs or {}), "reasoning_effort": request.reasoning_effort}

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

    # ---- the streaming hooks ---------------------------------------------------------------------

    def opening_choices(self, request: ChatCompletionRequest, num_prompts: int) -> Iterator[dict[str, Any]]:
        for index in range(request.n):  # OpenAI sends the role first, on its own
            yield _choice(index, {"role": "assistant", "content": ""})

    def delta_choice(
        self,
        request: ChatCompletionRequest,
        index: int,
        output: RequestOutput,
        sample: CompletionOutput,
        delta: str,
        state: ChoiceState,
    ) -> dict[str, Any] | None:
        assert isinstance(state, ChatChoiceState) and state.deltas is not None
        finished = sample.finish_reason is not None
        message_delta = state.deltas.delta(sample.text, finished)
        if not message_delta and not finished:
            return None  # the parser holds text back (a tool-call or reasoning tag may be starting)
        logprobs = self._logprobs(request, sample, state.sent_tokens) if request.logprobs else None
        finish_reason = state.deltas.finish_reason(sample.finish_reason)
        return _choice(index, message_delta, logprobs, finish_reason, sample.stop_reason)


def _choice(
    index: int,
    delta: dict[str, Any],
    logprobs: ChatLogprobs | None = None,
    finish: str | None = None,
    stop_reason: int | str | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs.model_dump() if logprobs else None,
        "finish_reason": finish,
        "stop_reason": stop_reason,
    }
