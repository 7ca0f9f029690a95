"""`pagoda serve --speculative-config`: a real server process, compared with one that does not speculate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from conftest import MODEL_NAME, start_server

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def test_speculating_server_answers_like_the_plain_one(
    tiny_model: Path, client: openai.OpenAI, tmp_path: Path
) -> None:
    spec = start_server(tmp_path, str(tiny_model), "--served-model-name", MODEL_NAME,
                        "--speculative-config", json.dumps(NGRAM))
    try:
        spec_client = spec.client()
        for prompt in ["abcabcabcabc", "the cat sat on the mat, the cat sat on the", "xyz" * 7]:
            options = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}
            want = client.completions.create(**options)
            got = spec_client.completions.create(**options)
            assert got.choices[0].text == want.choices[0].text
            assert got.usage.completion_tokens == want.usage.completion_tokens
        sampled = spec_client.completions.create(
            model=MODEL_NAME, prompt="abab" * 5, max_tokens=16, temperature=0.8, top_p=0.9, n=2, seed=1,
            extra_body={"ignore_eos": True},
        )
        assert [c.finish_reason for c in sampled.choices] == ["length", "length"]
        spec.wait_idle()  # every block back, rejected proposals' included
        drafts = spec.metric("vllm:spec_decode_num_draft_tokens_total", model_name=MODEL_NAME)
        accepted = spec.metric("vllm:spec_decode_num_accepted_tokens_total", model_name=MODEL_NAME)
        assert spec.metric("vllm:spec_decode_num_drafts_total", model_name=MODEL_NAME) > 0
        assert drafts >= accepted > 0
    finally:
        assert spec.stop() == 0, spec.log()[-4000:]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"method": "ngram", "num_speculative_tokens": 2, "k": 1}', "unknown key"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_speculative_config_is_refused_at_start(value: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pagoda", "serve", "--speculative-config", value],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr
