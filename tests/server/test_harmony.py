"""gpt-oss's harmony chat format: replies rendered by gpt-oss's own chat template (the message part of
`chat_template.jinja` as released with openai/gpt-oss-20b, below) split by `--reasoning-parser
openai_gptoss` into reasoning and answer, whole, streamed character by character and token by token; and
a tiny gpt-oss served with that template, its reply forced into harmony by a grammar, reaching the
official client as reasoning_content and content."""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai
import pytest
from conftest import MODEL_NAME, start_server
from test_tool_parsers import streamed
from tiny_models import make_tiny_model, make_tiny_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pagoda.entrypoints.chat_output import ChatDeltas, ChatOutputParser
from pagoda.entrypoints.reasoning import HarmonyParser

MARKERS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")

# gpt-oss's template without its tool-definition rendering (TypeScript namespaces, builtin tools), which
# these replies do not depend on; the system message, the channels and the generation prompt as released
HARMONY_TEMPLATE = """
{%- macro build_system_message() -%}
    {%- if model_identity is not defined %}
        {%- set model_identity = "You are ChatGPT, a large language model trained by OpenAI." %}
    {%- endif %}
    {{- model_identity + "\\n" }}
    {{- "Knowledge cutoff: 2024-06\\n" }}
    {{- "Current date: " + strftime_now("%Y-%m-%d") + "\\n\\n" }}
    {%- if reasoning_effort is not defined %}
        {%- set reasoning_effort = "medium" %}
    {%- endif %}
    {{- "Reasoning: " + reasoning_effort + "\\n\\n" }}
    {{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
    {%- if tools -%}
        {{- "\\nCalls to these tools must go to the commentary channel: 'functions'." }}
    {%- endif -%}
{%- endmacro -%}
{{- "<|start|>system<|message|>" }}
{{- build_system_message() }}
{{- "<|end|>" }}
{%- if messages[0].role == "developer" or messages[0].role == "system" %}
    {%- set developer_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set developer_message = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if developer_message %}
    {{- "<|start|>developer<|message|># Instructions\\n\\n" + developer_message + "<|end|>" }}
{%- endif %}
{%- set last_tool_call = namespace(name=none) %}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {%- if "tool_calls" in message %}
            {%- set future_final_message = namespace(found=false) %}
            {%- for future_message in loop_messages[loop.index:] %}
                {%- if future_message.role == 'assistant' and "tool_calls" not in future_message %}
                    {%- set future_final_message.found = true %}
                {%- endif %}
            {%- endfor %}
            {%- set tool_call = message.tool_calls[0] %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.thinking and not future_final_message.found %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
            {%- endif %}
            {{- "<|start|>assistant to=" }}
            {{- "functions." + tool_call.name + "<|channel|>commentary " }}
            {{- (tool_call.content_type if tool_call.content_type is defined else "json") + "<|message|>" }}
            {{- tool_call.arguments|tojson }}
            {{- "<|call|>" }}
            {%- set last_tool_call.name = tool_call.name %}
        {%- elif loop.last and not add_generation_prompt %}
            {%- if "thinking" in message %}
                {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
            {%- endif %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|return|>" }}
        {%- else %}
            {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
            {%- set last_tool_call.name = none %}
        {%- endif %}
    {%- elif message.role == 'tool' -%}
        {{- "<|start|>functions." + last_tool_call.name }}
        {{- " to=assistant<|channel|>commentary<|message|>" + message.content|tojson + "<|end|>" }}
    {%- elif message.role == 'user' -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}
"""

QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}]
THINKING = "The user asks 2 + 2. Simple: 4. Reply <b>briefly</b>."


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = make_tiny_tokenizer(MARKERS)
    tokenizer.chat_template = HARMONY_TEMPLATE
    return tokenizer


def reply_of(tokenizer: PreTrainedTokenizerFast, conversation: list[dict]) -> list[int]:
    """The tokens the model writes for the conversation's last assistant turn: the template's rendering of
    the whole conversation past the generation prompt of the conversation before it."""
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert whole.startswith(prompt) and prompt.endswith("<|start|>assistant")
    return tokenizer.encode(whole[len(prompt) :], add_special_tokens=False)


def both_ways(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> dict:
    """The parsed message, checked equal to the stream of it fed by characters and by tokens."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    parser = ChatOutputParser(reasoning=HarmonyParser())
    message, _ = parser.message(text, "stop")
    by_char = streamed(parser, text)
    assert by_char["reasoning"] == message.get("reasoning_content", "")
    assert by_char["content"] == message["content"]
    deltas, reasoning, content = ChatDeltas(parser), "", ""
    for end in range(1, len(ids) + 1):
        delta = deltas.delta(tokenizer.decode(ids[:end], skip_special_tokens=False), end == len(ids))
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
        assert "<|" not in content + reasoning or "to=" in content  # markers never leak, but in calls
    assert (reasoning, content) == (message.get("reasoning_content", ""), message["content"])
    return message


def test_analysis_is_reasoning_and_final_is_the_answer(tokenizer: PreTrainedTokenizerFast) -> None:
    answer = "2 + 2 = **4**."
    ids = reply_of(tokenizer, [*QUESTION, {"role": "assistant", "thinking": THINKING, "content": answer}])
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|channel|>"  # the markers are special tokens...
    plain = tokenizer.decode(ids, skip_special_tokens=True)
    assert plain == f"analysis{THINKING}assistantfinal{answer}"  # ...gone from text that skips them
    assert both_ways(tokenizer, ids) == {"content": answer, "reasoning_content": THINKING}
    # no analysis at all (a low reasoning effort may skip it)
    ids = reply_of(tokenizer, [*QUESTION, {"role": "assistant", "content": answer}])
    assert both_ways(tokenizer, ids) == {"content": answer}


def test_a_tool_call_is_kept_verbatim_in_the_content(tokenizer: PreTrainedTokenizerFast) -> None:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ids = reply_of(tokenizer, [*QUESTION, {"role": "assistant", "thinking": THINKING, "tool_calls": [call]}])
    message = both_ways(tokenizer, ids)
    assert message["reasoning_content"] == THINKING
    assert message["content"] == (
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}'
    )


def test_partial_replies() -> None:
    parser = HarmonyParser()
    assert parser.split("<|chan", finished=False) == ("", None)  # the opening marker may be coming
    assert parser.split("<|channel|>analysis<|message|>Let me<|en", finished=False) == ("Let me", None)
    assert parser.split("<|channel|>analysis<|message|>Let me think", finished=True) == ("Let me think", "")
    text = "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>final<|message|>b<|ret"
    assert parser.split(text, finished=False) == ("a", "b")
    assert parser.split("Plain text, not harmony.", finished=True) == ("", "Plain text, not harmony.")
    # two analysis messages (around a preamble) are one reasoning, joined by a newline
    text = ("<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>commentary<|message|>p<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>c<|end|>")
    assert parser.split(text, finished=True) == ("a\nc", "p")


# --- served ----------------------------------------------------------------------------------------------

# a harmony reply made certain: the markers as the special tokens they are, the bodies free text
REPLY_GRAMMAR = (
    'start: <|channel|> "analysis" <|message|> /[a-z]{1,8}/ <|end|> '
    '<|start|> "assistant" <|channel|> "final" <|message|> /[A-Z][a-z]{1,6}/'
)


def test_gpt_oss_chat_renders_its_template_and_returns_reasoning_apart(tmp_path: Path) -> None:
    model = make_tiny_model("gpt_oss", tmp_path / "gpt_oss", with_tokenizer=False)
    config = json.loads((model / "config.json").read_text())  # byte tokens: the system message alone is 250
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    tokenizer = make_tiny_tokenizer(MARKERS)
    tokenizer.chat_template = HARMONY_TEMPLATE
    tokenizer.save_pretrained(model)  # chat_template.jinja, as gpt-oss's directories ship it
    server = start_server(tmp_path, str(model), "--served-model-name", "gpt-oss", "--reasoning-parser",
                          "openai_gptoss")
    try:
        client = server.client()
        request = {"model": "gpt-oss", "messages": QUESTION, "max_tokens": 64, "temperature": 0,
                   "extra_body": {"guided_grammar": REPLY_GRAMMAR}}
        response = client.chat.completions.create(**request)
        message = response.choices[0].message
        assert response.choices[0].finish_reason == "stop"  # the grammar ended the reply
        assert re.fullmatch("[a-z]{1,8}", message.reasoning_content), message
        assert re.fullmatch("[A-Z][a-z]{1,6}", message.content), message
        # the prompt is transformers' rendering of the messages with the directory's template
        reference = AutoTokenizer.from_pretrained(model)
        prompt = reference.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
        assert response.usage.prompt_tokens == len(reference.encode(prompt, add_special_tokens=False))
        with client.chat.completions.stream(**request) as stream:
            reasoning = "".join(
                getattr(e.chunk.choices[0].delta, "reasoning_content", None) or ""
                for e in stream if e.type == "chunk" and e.chunk.choices
            )
            final = stream.get_final_completion()
        assert reasoning == message.reasoning_content  # greedy: the same reply, in pieces
        assert final.choices[0].message.content == message.content
        # reasoning_effort reaches the template ("Reasoning: high" in the system message)
        high = client.chat.completions.create(**{**request, "reasoning_effort": "high"})
        prompt = reference.apply_chat_template(
            QUESTION, tokenize=False, add_generation_prompt=True, reasoning_effort="high"
        )
        assert "Reasoning: high" in prompt
        assert high.usage.prompt_tokens == len(reference.encode(prompt, add_special_tokens=False))
        server.wait_idle()
    finally:
        assert server.stop() == 0, server.log()[-4000:]


def test_reasoning_effort_needs_a_template_that_reads_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):  # the tiny Llama's toy template
        client.chat.completions.create(
            model=MODEL_NAME, messages=QUESTION, max_tokens=2, reasoning_effort="low"
        )
