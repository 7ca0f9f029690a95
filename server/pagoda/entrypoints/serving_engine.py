"""What the completion and chat endpoints share: model names, tokenizing, limits, submitting, SSE."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from pagoda.engine.async_engine import AsyncLLM, EngineDeadError, RequestStream
from pagoda.entrypoints.constraints import Constraint, check_grammar, structured_outputs_of, template_message
from pagoda.entrypoints.errors import OpenAIError, bad_request, error_body
from pagoda.entrypoints.protocol import ChatMessage, SamplingRequest
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_chunk(
    request_id: str, object_name: str, created: int, model: str, choice: dict[str, Any], include_usage: bool
) -> str:
    """One streamed chunk holding one choice; `usage` is null on every chunk but the final usage one."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if include_usage:
        body["usage"] = None
    return sse(body)


def sse_error(status: int, message: str) -> str:
    return sse(error_body(status, message))


class ServingEngine:
    """Holds the engine handle and the server's limits; the endpoint classes build on it."""

    def __init__(self, llm: AsyncLLM, served_model_names: list[str], max_queue_len: int | None) -> None:
        engine = llm.engine
        assert engine is not None, "the engine must be loaded before serving"
        self.llm = llm
        self.served_model_names = served_model_names
        self.max_model_len: int = engine.max_model_len
        self.max_queue_len = max_queue_len
        # the engine thread detokenizes with the engine's tokenizer; the event loop gets its own copy, so
        # the two threads never share one Rust tokenizer object
        self.tokenizer = copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None
        self.vocab_size: int = getattr(engine, "vocab_size", len(self.tokenizer) if self.tokenizer else 0)
        self._token_text: dict[int, str] = {}

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise bad_request("this server has no tokenizer: send token ids")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._require_tokenizer().encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int]) -> str:
        self.check_token_ids(token_ids)
        return self._require_tokenizer().decode(token_ids)

    def token_text(self, token_id: int) -> str:
        """A single token as text (what logprobs report); cached, the vocabulary is fixed."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._require_tokenizer().decode([token_id])
        return text

    def check_token_ids(self, token_ids: list[int], param: str = "tokens") -> None:
        if any(t >= self.vocab_size for t in token_ids):
            raise bad_request(f"token ids must be in [0, {self.vocab_size})", param)

    def chat_prompt_ids(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        tokenizer = self._require_tokenizer()
        conversation = [template_message(m) for m in messages]
        try:
            text = tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **(template_kwargs or {}),
            )
        except Exception as error:  # a template may reject a conversation (e.g. roles out of order)
            raise bad_request(f"the chat template rejected the messages: {error}", "messages") from error
        # the template writes the special tokens itself
        return self.encode(text, add_special_tokens=False)

    def resolve_max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """The completion budget: as asked, or the rest of the context; 400 if it cannot fit."""
        if prompt_len == 0:
            raise bad_request("the prompt is empty", "prompt")
        max_tokens = self.max_model_len - prompt_len if requested is None else requested
        if max_tokens < 1 or prompt_len + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the prompt, {max(max_tokens, 1)} "
                "for the completion). Please reduce the length of the prompt or of the completion.",
                "max_tokens" if requested is not None else "messages",
                "context_length_exceeded",
            )
        return max_tokens

    def check_queue(self) -> None:
        if self.max_queue_len is not None and self.llm.num_waiting_requests >= self.max_queue_len:
            raise OpenAIError(
                429,
                f"the server's waiting queue is full ({self.max_queue_len} requests); retry later",
                code="queue_full",
            )

    async def constrain(self, request: SamplingRequest, params: SamplingParams) -> SamplingParams:
        """`params` with the request's structured-output constraint, its grammar built (400 if invalid)."""
        constraint = structured_outputs_of(request)
        return params if constraint is None else await self.constrain_to(constraint, params)

    async def constrain_to(self, constraint: Constraint, params: SamplingParams) -> SamplingParams:
        spec = await check_grammar(self.llm.engine.grammar_compiler, constraint)
        return dataclasses.replace(params, structured_outputs=spec)

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Hand a request to the engine; engine rejections become 400, a dead engine 503."""
        try:
            return await self.llm.add_request(request_id, prompt_ids, params)
        except ValueError as error:
            raise bad_request(str(error)) from error
        except EngineDeadError as error:
            raise OpenAIError(503, str(error), code="engine_unavailable") from error

    def outputs(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        return self.llm.outputs(stream)

    def top_logprobs(self, logprobs: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(logprobs.items(), key=lambda item: -item[1])[:k]
