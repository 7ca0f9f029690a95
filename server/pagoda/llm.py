"""The offline API, in vLLM's shape: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceOf
from itertools import count
from typing import Any, TypedDict, cast

from tqdm import tqdm

from pagoda.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


Prompt = str | TokensPrompt | list[int]
ChatMessage = dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_options))
        self._ids = count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs come back in prompt order."""
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        # only the finished outputs are read: none are built for the steps before (vLLM's LLM does the same)
        final = {id(p): dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params}
        params = [final[id(p)] for p in params]
        order: dict[str, int] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, _prompt_input(prompt), p)
            order[request_id] = i
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        if messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = cast(list[list[ChatMessage]], messages)
        prompts: list[Prompt] = [
            TokensPrompt(prompt_token_ids=_chat_token_ids(tokenizer, conv, add_generation_prompt))
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        with tqdm(total=len(order), desc="Processed prompts", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[order[output.request_id]] = output
                        bar.update(1)
        return [r for r in results if r is not None]


def _prompt_list(prompts: Prompt | SequenceOf[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids or a TokensPrompt) or a sequence of them, as a list of prompts."""
    if isinstance(prompts, str | dict):
        return [cast(Prompt, prompts)]
    items = list(prompts)
    if items and isinstance(items[0], int):  # one prompt of token ids
        return [cast(list[int], items)]
    return cast(list[Prompt], items)


def _prompt_input(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        return list(prompt["prompt_token_ids"])
    return prompt


def _chat_token_ids(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # the template writes any special tokens itself
    return tokenizer.encode(text, add_special_tokens=False)
