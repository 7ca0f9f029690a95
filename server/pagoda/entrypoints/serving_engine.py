"""What the completion and chat endpoints share: model names, tokenizing (off the event loop), limits,
submitting, engine-error mapping, and one SSE streaming loop.

Tokenizing a long prompt and rendering a chat template take CPU time that must not hold the event loop
(the probes answer from it), so both run on one worker thread with its own tokenizer copy. A template
render has a time limit: a request may send the variables a template loops over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from pagoda.engine.async_engine import (
    AsyncLLM,
    EngineDeadError,
    RequestAbortedError,
    RequestFailedError,
    RequestStream,
)
from pagoda.entrypoints.constraints import Constraint, check_grammar, structured_outputs_of, template_message
from pagoda.entrypoints.errors import OpenAIError, bad_request, error_body
from pagoda.entrypoints.protocol import ChatMessage, SamplingRequest
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"
TEMPLATE_TIME_LIMIT_S = 2.0  # real chat templates render in milliseconds
MAX_SEQS_PER_REQUEST = 128  # prompts x n, as OpenAI's bound on n
# a request may ask for at most this many times max_model_len generated tokens in all (n x prompts x
# max_tokens): beyond that one client holds the engine for the time of many full-context requests
MAX_REQUEST_TOKENS_PER_CONTEXT = 16
T = TypeVar("T")


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class TemplateTimeoutError(Exception):
    pass


def _call_with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """Run `fn` on this thread, raising TemplateTimeoutError in it once `seconds` have passed. A trace
    function sees every call (and every resumption of a generator, which is how Jinja renders loops)."""
    deadline = time.monotonic() + seconds

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and time.monotonic() > deadline:
            raise TemplateTimeoutError(f"the chat template took longer than {seconds:g} s to render")

    previous = sys.gettrace()  # e.g. a coverage tool's
    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(previous)


@functools.cache
def _reserved_template_kwargs(tokenizer_class: type) -> frozenset[str]:
    """apply_chat_template's own parameters: a template variable with one of these names would change how
    it runs (e.g. tokenize=True), not what the template sees. Read from the tokenizer's class when first
    needed, so importing this module does not import transformers."""
    return frozenset(inspect.signature(tokenizer_class.apply_chat_template).parameters) - {"self", "kwargs"}


class Tokenizers:
    """The HTTP side's tokenizers, shared by the endpoints: the engine thread detokenizes with the engine's
    own; the event loop (single tokens for logprobs, /detokenize) and the worker thread (prompts, chat
    templates) each get a copy, so that no two threads share one Rust tokenizer object."""

    def __init__(self, tokenizer: Any) -> None:
        self.on_loop = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.on_worker = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pagoda-tokenize")
        # no token covers more characters than its own text in the vocabulary (a byte-level token's text
        # has one character per byte): a text longer than max_model_len times this cannot fit
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        self.max_token_chars: int = max(map(len, vocab), default=1)


@dataclass
class ChoiceState:
    """What one streamed choice has sent so far."""

    sent_text: int = 0  # characters of the sample's text
    sent_tokens: int = 0
    text_offset: int = 0  # completions' logprobs: text offset of the next token
    started: bool = False  # has seen an output
    done: bool = False


class ServingEngine:
    """Holds the engine handle and the server's limits; the endpoint classes build on it."""

    object_name = ""  # of the streamed chunks

    def __init__(
        self,
        llm: AsyncLLM,
        served_model_names: list[str],
        max_queue_len: int | None,
        trust_request_chat_template: bool = False,
        tokenizers: Tokenizers | None = None,
    ) -> None:
        engine = llm.engine
        assert engine is not None, "the engine must be loaded before serving"
        self.llm = llm
        self.served_model_names = served_model_names
        self.max_model_len: int = engine.max_model_len
        self.max_queue_len = max_queue_len
        self.trust_request_chat_template = trust_request_chat_template
        tokenizers = tokenizers or Tokenizers(engine.tokenizer)
        self.tokenizer = tokenizers.on_loop
        self._worker_tokenizer = tokenizers.on_worker
        self._worker = tokenizers.worker
        self.max_text_chars = self.max_model_len * tokenizers.max_token_chars
        self.vocab_size: int = getattr(engine, "vocab_size", len(self.tokenizer) if self.tokenizer else 0)
        self._token_text: dict[int, str] = {}

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def _require_tokenizer(self, tokenizer: Any) -> Any:
        if tokenizer is None:
            raise bad_request("this server has no tokenizer: send token ids")
        return tokenizer

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    # ---- tokenizing (on the worker thread) -------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        tokenizer = self._require_tokenizer(self._worker_tokenizer)
        return await self._off_loop(lambda: self._encode(tokenizer, text, add_special_tokens, param))

    def _encode(self, tokenizer: Any, text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise bad_request("the text holds a lone UTF-16 surrogate", param) from error
        if len(text) > self.max_text_chars:
            # found too long without tokenizing it: a 30 MB prompt held the tokenizing thread, which every
            # request waits on, for 50 s (and 300 MB of token ids)
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens, and the {param} has "
                f"{len(text)} characters: more than that many tokens can hold. Please reduce its length.",
                param,
                "context_length_exceeded",
            )
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def detokenize(self, token_ids: list[int]) -> str:
        """/detokenize: on the worker thread, as a million tokens take seconds to decode."""
        self.check_token_ids(token_ids)
        tokenizer = self._require_tokenizer(self._worker_tokenizer)
        return await self._off_loop(lambda: tokenizer.decode(token_ids))

    async def chat_prompt_ids(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        tokenizer = self._require_tokenizer(self._worker_tokenizer)
        if chat_template is not None and not self.trust_request_chat_template:
            raise bad_request(
                "this server does not accept chat templates from requests (--trust-request-chat-template)",
                "chat_template",
            )
        reserved = sorted(_reserved_template_kwargs(type(tokenizer)) & set(template_kwargs or {}))
        if reserved:
            raise bad_request(
                f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs"
            )
        def render() -> list[int]:
            conversation = [template_message(m) for m in messages]  # a million messages take seconds
            try:
                text = _call_with_deadline(
                    lambda: tokenizer.apply_chat_template(
                        conversation,
                        tools=tools,
                        tokenize=False,
                        add_generation_prompt=add_generation_prompt,
                        chat_template=chat_template,
                        **(template_kwargs or {}),
                    ),
                    TEMPLATE_TIME_LIMIT_S,
                )
            except TemplateTimeoutError as error:
                raise bad_request(str(error), "chat_template_kwargs", "template_timeout") from error
            except Exception as error:  # a template may reject a conversation (e.g. roles out of order)
                raise bad_request(f"the chat template rejected the messages: {error}", "messages") from error
            # the template writes the special tokens itself
            return self._encode(tokenizer, text, False, "messages")

        return await self._off_loop(render)

    # ---- on the event loop -----------------------------------------------------------------------

    async def constrain(self, request: SamplingRequest, params: SamplingParams) -> SamplingParams:
        """`params` with the request's structured-output constraint, its grammar built (400 if invalid)."""
        constraint = structured_outputs_of(request)
        return params if constraint is None else await self.constrain_to(constraint, params)

    async def constrain_to(self, constraint: Constraint, params: SamplingParams) -> SamplingParams:
        spec = await check_grammar(self.llm.engine.grammar_compiler, constraint)
        return dataclasses.replace(params, structured_outputs=spec)

    def decode(self, token_ids: list[int]) -> str:
        self.check_token_ids(token_ids)
        return self._require_tokenizer(self.tokenizer).decode(token_ids)

    def token_text(self, token_id: int) -> str:
        """A single token as text (what logprobs report); cached, the vocabulary is fixed."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self._require_tokenizer(self.tokenizer).decode([token_id])
        return text

    def check_token_ids(self, token_ids: Any, param: str = "tokens") -> None:
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise bad_request(f"{param}: token ids must be in [0, {self.vocab_size})", param)

    def check_sampling(self, request: SamplingRequest) -> None:
        """Every token id a request's sampling fields carry must be one of the model's."""
        self.check_token_ids(request.stop_token_ids or [], "stop_token_ids")
        self.check_token_ids(request.logit_bias_ids or {}, "logit_bias")
        self.check_token_ids(request.allowed_token_ids or [], "allowed_token_ids")
        if request.bad_words and self.tokenizer is None:
            raise bad_request("bad_words needs a tokenizer", "bad_words")

    @staticmethod
    def sampling_params(request: SamplingRequest, *args: Any) -> SamplingParams:
        """`request.sampling_params(*args)`; the checks across fields that SamplingParams makes (e.g.
        min_tokens above the max_tokens resolved from the context) are 400s naming the field they name
        first."""
        try:
            return request.sampling_params(*args)
        except ValueError as error:
            field = str(error).split(" ", 1)[0]
            raise bad_request(str(error), field if field in type(request).model_fields else None) from error

    def resolve_max_tokens(self, prompt_len: int, requested: int | None, prompt_param: str) -> int:
        """The completion budget: as asked, or the rest of the context; 400 if it cannot fit, naming the
        prompt when the prompt alone leaves no room, else max_tokens."""
        if prompt_len == 0:
            raise bad_request("the prompt is empty", prompt_param)
        max_tokens = self.max_model_len - prompt_len if requested is None else requested
        if max_tokens < 1 or prompt_len + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the prompt, {max(max_tokens, 1)} "
                "for the completion). Please reduce the length of the prompt or of the completion.",
                "max_tokens" if requested is not None and prompt_len < self.max_model_len else prompt_param,
                "context_length_exceeded",
            )
        return max_tokens

    def check_num_seqs(self, num_seqs: int) -> None:
        """Bound the sequences (prompts x n) of one request, and 429 if the queue cannot take them now."""
        if num_seqs > MAX_SEQS_PER_REQUEST:
            raise bad_request(
                f"a request may run at most {MAX_SEQS_PER_REQUEST} sequences (prompts x n)", "n"
            )
        if self.max_queue_len is not None and num_seqs > self.max_queue_len:
            raise bad_request(
                f"the request has {num_seqs} sequences (prompts x n) but the server queues at most "
                f"{self.max_queue_len} (--max-queue-len)",
                "n",
            )
        self.check_queue(num_seqs)

    def check_generated_tokens(self, n: int, max_tokens: list[int], echoed: list[int] | None = None) -> None:
        """Bound the tokens one request may generate in all (`max_tokens` has one entry per prompt), and
        the prompt tokens it gets back with their logprobs in every sample (`echoed`, per prompt): those
        cost as much to build and send, on the event loop (n=128 echoes of a 32k-token prompt with 20
        logprobs would be gigabytes of JSON)."""
        limit = MAX_REQUEST_TOKENS_PER_CONTEXT * self.max_model_len
        total = n * (sum(max_tokens) + sum(echoed or []))
        if total > limit:
            what = "n x (max_tokens + the echoed prompt)" if any(echoed or []) else "n x max_tokens"
            raise bad_request(
                f"the request asks for {total} tokens in all ({what} per prompt); "
                f"at most {limit} are allowed: lower n or max_tokens",
                "max_tokens",
            )

    def check_queue(self, num_seqs: int) -> None:
        """429 when the waiting sequences plus this request's would overflow --max-queue-len."""
        if self.max_queue_len is not None and self.llm.num_waiting_seqs + num_seqs > self.max_queue_len:
            raise OpenAIError(
                429,
                f"the server's waiting queue is full ({self.max_queue_len} sequences); retry later",
                code="queue_full",
            )

    async def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Hand a request to the engine; engine rejections become 400, a dead engine 503."""
        try:
            return await self.llm.add_request(request_id, prompt_ids, params)
        except ValueError as error:
            raise bad_request(str(error)) from error
        except EngineDeadError as error:
            raise OpenAIError(503, str(error), code="engine_unavailable") from error

    async def submit_all(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[RequestStream]:
        """Submit one engine request per prompt (`request_id-i`); if one fails the others are aborted."""
        streams: list[RequestStream] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                streams.append(await self.submit(f"{request_id}-{i}", prompt, p))
        except BaseException:
            for stream in streams:
                self.llm.abort_nowait(stream.request_id)
            raise
        return streams

    def top_logprobs(self, logprobs: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(logprobs.items(), key=lambda item: -item[1])[:k]

    # ---- results ---------------------------------------------------------------------------------

    async def final_outputs(self, streams: list[RequestStream]) -> list[RequestOutput]:
        """Each request's finished output; a failure (or the client leaving) ends the siblings too."""

        async def last(stream: RequestStream) -> RequestOutput:
            final: RequestOutput | None = None
            async for output in self.llm.outputs(stream):
                final = output
            assert final is not None and final.finished
            return final

        tasks = [asyncio.ensure_future(last(s)) for s in streams]
        try:
            with engine_errors():
                return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    # ---- streaming: one loop for both endpoints; the hooks render their choices --------------------

    def opening_choices(self, request: Any, num_prompts: int) -> Iterator[dict[str, Any]]:
        """Choices sent before any output (chat: the role)."""
        return iter(())

    def first_choice(
        self,
        request: Any,
        prompt_index: int,
        output: RequestOutput,
        sample: CompletionOutput,
        state: ChoiceState,
    ) -> dict[str, Any] | None:
        """A choice sent with a sample's first output, before its first delta (completions: the echo)."""
        return None

    def delta_choice(
        self,
        request: Any,
        index: int,
        output: RequestOutput,
        sample: CompletionOutput,
        delta: str,
        state: ChoiceState,
    ) -> dict[str, Any] | None:
        """The choice that carries `delta`, or None to hold it back until more text comes."""
        raise NotImplementedError

    async def stream(
        self,
        request: Any,
        request_id: str,
        streams: list[RequestStream],
        prompt_tokens: int,
        new_state: Callable[[], ChoiceState] = ChoiceState,
    ) -> AsyncIterator[str]:
        """SSE chunks of one request's choices (prompt-major: prompt p, sample j is choice p * n + j),
        then the usage chunk when asked, then [DONE]; an engine failure ends the stream with an error."""
        created = int(time.time())
        model = request.model or self.model_name
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        n = request.n
        states = [new_state() for _ in range(len(streams) * n)]
        completion_tokens = 0

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            body: dict[str, Any] = {
                "id": request_id,
                "object": self.object_name,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = usage  # null on every chunk but the last
            return sse(body)

        try:
            for choice in self.opening_choices(request, len(streams)):
                yield chunk([choice])
            async for p, output in _merge(self.llm, streams):
                for sample in output.outputs:
                    i = p * n + sample.index
                    state = states[i]
                    if not state.started:
                        state.started = True
                        first = self.first_choice(request, p, output, sample, state)
                        if first is not None:
                            yield chunk([first])
                    if state.done:
                        continue
                    delta = sample.text[state.sent_text :]
                    finished = sample.finish_reason is not None
                    if not delta and not finished:
                        continue  # the detokenizer holds text back (partial UTF-8, a possible stop string)
                    choice = self.delta_choice(request, i, output, sample, delta, state)
                    if choice is None:
                        continue
                    state.sent_text, state.sent_tokens = len(sample.text), len(sample.token_ids)
                    if finished:
                        state.done = True
                        completion_tokens += len(sample.token_ids)
                    yield chunk([choice])
            if include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield chunk([], usage)
        except (RequestAbortedError, RequestFailedError, EngineDeadError) as error:
            failure = engine_error(error)
            yield sse(error_body(failure.status, failure.message, code=failure.code))
        finally:
            for stream in streams:
                self.llm.abort_nowait(stream.request_id)  # no-op once finished
        yield SSE_DONE


def engine_error(error: BaseException) -> OpenAIError:
    """What a client is told when the engine ends its request early."""
    if isinstance(error, RequestAbortedError):
        return OpenAIError(
            503, "the request was aborted: the server is shutting down", code="server_shutting_down"
        )
    if isinstance(error, RequestFailedError):
        return OpenAIError(500, str(error), code="request_failed")
    return OpenAIError(503, str(error), code="engine_dead")


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    try:
        yield
    except (RequestAbortedError, RequestFailedError, EngineDeadError) as error:
        raise engine_error(error) from error


async def _merge(llm: AsyncLLM, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the prompt index."""
    if len(streams) == 1:
        async for output in llm.outputs(streams[0]):
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in llm.outputs(stream):
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
