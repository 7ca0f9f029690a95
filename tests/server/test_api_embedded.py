"""The embedded SmolLM2-135M-Instruct behind `pagoda serve` (no MODEL argument) answers correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import start_server


@pytest.mark.slow  # loading and warming up the 135M model takes a while on a shared 2-core CPU
def test_embedded_model_knows_the_capital_of_france(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--max-model-len", "512")
    try:
        assert server.answered_503_while_loading  # /ready said 503 until loaded and warmed up
        assert "cold start: import" in server.log()
        client = server.client(timeout=300)
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        question = {
            "model": "SmolLM2-135M-Instruct",
            "max_tokens": 12,
            "temperature": 0,
            # a sentence, not a bare question: see test_the_embedded_model_answers_a_factual_question
            "messages": [
                {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
            ],
        }
        answer = client.chat.completions.create(**question)
        assert "Paris" in answer.choices[0].message.content
        streamed = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(**question, stream=True)
        )
        assert streamed == answer.choices[0].message.content
        server.wait_idle()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
