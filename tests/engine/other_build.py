"""A test module's tests again under the x86-64-v3 build of Pagoda's operators (the image's: their AVX2 code),
on a machine whose own build runs their AVX-512 code: in a process that loads that library instead of this
machine's (`PAGODA_TEST_CPU_LIBRARY`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pagoda import cpu_extension

LIBRARY_ENV = "PAGODA_TEST_CPU_LIBRARY"


def use_requested_build() -> bool:
    """At a test module's import: load the library the environment names, if it names one (and say so)."""
    library = os.environ.get(LIBRARY_ENV)
    if library:
        cpu_extension.library_path = lambda: Path(library)  # type: ignore[assignment]
    return bool(library)


def rerun_under_x86_64_v3(test_file: str) -> None:
    """Run `test_file`'s tests but this one (`-k "not v3_build"`) against the x86-64-v3 build, made once per
    checkout and machine in the temporary directory (where `bench.step_profile --isa avx2` makes it too);
    every one must pass, none skip."""
    native = cpu_extension.library_path()
    library = cpu_extension.build("x86-64-v3", Path(tempfile.gettempdir()) / f"x86-64-v3{native.name}")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    env = {**os.environ, LIBRARY_ENV: str(library)}
    result = subprocess.run([*command, "-k", "not v3_build"], env=env, capture_output=True, text=True)
    output = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0 and " passed" in result.stdout and "skipped" not in result.stdout, output
