"""schemathesis fuzzes the API (/v1/*, /tokenize, /detokenize) from the server's own OpenAPI document,
seeded and derandomized so a failure replays: no request may cause a 5xx, and the server stays alive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from conftest import LiveServer


def test_no_generated_request_causes_a_server_error(server: LiveServer, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).parent / "st"
    command = [
        str(schemathesis),
        "run",
        f"{server.base_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,fuzzing",  # the coverage phase takes minutes on this CPU
        "--max-examples",
        "20",
        "--include-path-regex",
        "^/(v1/|tokenize|detokenize)",
        "--header",
        f"Authorization: Bearer {server.api_key}",
        "--generation-deterministic",
        "--request-timeout",
        "120",
        "--workers",
        "2",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    print(result.stdout[-1500:])  # the summary: operations, cases generated, checks passed
    assert httpx.get(f"{server.base_url}/health").status_code == 200
