"""Request and response bodies of the OpenAI API (plus vLLM's sampling extras), as pydantic models.

The bounds declared here are the validation (a violation is a 400) and also what the OpenAPI
document advertises. Types are strict, as in OpenAI's API: "logprobs": "yes" or "n": 1.0 is a 400,
not a guess. Token ids are bounded here only by their type; the server checks them against the
model's vocabulary, which this module does not know.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pagoda.sampling_params import SamplingParams

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
# a bound on every token-id list, far above any context: validating 15M ids held the loop for seconds
MAX_TOKEN_IDS = 2**20
# fail_fast: a union tries each member in turn, and a list member that does not fit would otherwise collect
# one error per item (10 s for a 32 MiB token-id prompt checked against list[str] first)
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_TOKEN_IDS, fail_fast=True)]
MAX_PROMPTS = 128  # as serving_engine.MAX_SEQS_PER_REQUEST: prompts x n
# a Lark / GBNF grammar's build is not bounded by llguidance's fuel: 100k alternatives took 17 s of CPU,
# which went on after the compile timeout answered; 64 KiB of grammar builds in about 0.1 s
MAX_GRAMMAR_CHARS = 2**16
MAX_TEMPLATE_INPUT_BYTES = 64 * 2**10  # a request's own chat template, and its chat_template_kwargs as JSON
MAX_BAD_WORDS = 128
# every step, the engine looks for the longest tail of the text that starts a stop string, at a cost that
# grows with the square of the string's length: 16 stop strings of 100k characters made a 200-token request
# take seconds per step, holding every other request
MAX_STOP_CHARS = 256


def _encodable(text: str) -> str:
    """Reject lone UTF-16 surrogates ("\\ud800" is legal JSON but no Unicode text: tokenizers fail on it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("the text is not valid Unicode (it holds a lone UTF-16 surrogate)") from error
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Grammar = Annotated[Text, Field(max_length=MAX_GRAMMAR_CHARS, description="A Lark or GBNF grammar.")]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # NaN and infinities are never valid numbers here. Unknown fields are ignored: the responses, and the
    # messages of a conversation, which clients send back as they got them (with refusal, annotations...)
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class RequestModel(OpenAIModel):
    """A request body or one of its options: an unknown field is a 400, as OpenAI's "Unrecognized request
    argument": the server could not honour it (use_beam_search, prompt_logprobs, modalities...)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(RequestModel):
    include_usage: bool | None = False


class StructuredOutputsRequest(RequestModel):
    """vLLM's `structured_outputs` extra: exactly one of these."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, populate_by_name=True)
    json_: Text | dict[str, Any] | None = Field(None, alias="json", description="A JSON schema.")
    regex: Text | None = None
    choice: list[Text] | None = Field(None, min_length=1)
    grammar: Grammar | None = None
    json_object: bool | None = None


class SamplingRequest(RequestModel):
    """Fields that completions and chat completions share."""

    model: Text | None = Field(None, description="Served model name; defaults to the served model.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = Field(
        None, description=f"Up to 16 strings (of at most {MAX_STOP_CHARS} characters) that end generation."
    )
    seed: int | None = Field(None, ge=_INT64_MIN, le=_INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: TokenIds | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    allowed_token_ids: Annotated[TokenIds, Field(min_length=1)] | None = None
    bad_words: list[Annotated[Text, Field(min_length=1, max_length=1024)]] | None = Field(
        None, max_length=MAX_BAD_WORDS
    )
    best_of: int | None = Field(None, ge=1, description="Only best_of == n is supported.")
    # vLLM's structured outputs, and the older guided_* spellings
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: Text | dict[str, Any] | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1)
    guided_grammar: Grammar | None = None

    # field validators rather than one model validator: an error then names its field (`param`)
    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of at most 16 non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n"):
            raise ValueError("best_of is not supported (other than best_of == n)")
        return best_of

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is not None and not all(key.isdecimal() and key.isascii() for key in bias):
            raise ValueError("logit_bias keys must be token ids (decimal integers as strings)")
        return bias

    @property
    def logit_bias_ids(self) -> dict[int, float] | None:
        return {int(key): value for key, value in self.logit_bias.items()} if self.logit_bias else None

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=self.stop_strings,
            # deduplicated: the engine scans these every step; a list of 1M copies of one id cost seconds each
            stop_token_ids=list(dict.fromkeys(self.stop_token_ids or [])),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.logit_bias_ids,
            allowed_token_ids=list(dict.fromkeys(self.allowed_token_ids)) if self.allowed_token_ids else None,
            bad_words=list(self.bad_words or []),
        )


# ---- completions -----------------------------------------------------------------------------------

Prompt = (
    Text
    | Annotated[list[Text], Field(max_length=MAX_PROMPTS, fail_fast=True)]
    | TokenIds
    | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS, fail_fast=True)]
)


class CompletionRequest(SamplingRequest):
    prompt: Prompt = Field(description="A string, a list of strings, token ids, or a list of token-id lists.")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Text | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and any(isinstance(p, list | str) and not p for p in prompt):
            raise ValueError("prompt must not contain empty prompts")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of strings or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


# ---- chat completions ------------------------------------------------------------------------------


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: Text


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message: which call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments.")
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(RequestModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs a json_schema')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'response_format of type "{self.type}" takes no json_schema')
        return self


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens."
    )
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    chat_template: Text | None = Field(
        None,
        max_length=MAX_TEMPLATE_INPUT_BYTES,
        description="A Jinja chat template for this request (needs --trust-request-chat-template).",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description=f"Extra template variables, at most {MAX_TEMPLATE_INPUT_BYTES} bytes as JSON."
    )
    response_format: ResponseFormat | None = None
    # gpt-oss's template reads it (`Reasoning: high` in the system message); 400 for a template that does not
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # the deprecated function-calling fields: rejected with a 400 (chat_request.py), never ignored
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs to be true")
        return top_logprobs

    @field_validator("chat_template_kwargs")
    @classmethod
    def _bound_template_kwargs(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        # the template sees these as variables: their size bounds what a template loop over them costs
        if kwargs is not None:
            try:
                size = len(json.dumps(kwargs, ensure_ascii=False).encode())
            except UnicodeEncodeError as error:
                raise ValueError("chat_template_kwargs holds a lone UTF-16 surrogate") from error
            if size > MAX_TEMPLATE_INPUT_BYTES:
                raise ValueError(f"chat_template_kwargs is larger than {MAX_TEMPLATE_INPUT_BYTES} bytes")
        return kwargs

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobsContent(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[ChatLogprobsContent] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


# ---- utility endpoints -----------------------------------------------------------------------------


class TokenizeRequest(RequestModel):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: Text | None = None
    tokens: TokenIds


class DetokenizeResponse(OpenAIModel):
    prompt: str


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    root: str | None = None
    max_model_len: int


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo
