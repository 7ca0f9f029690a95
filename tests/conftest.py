"""Suite-wide settings."""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Generator

import pytest

# Two cores are shared by the test process and the servers it starts: oversubscribed threads cost far
# more than they gain on the tiny models the tests use.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch
except ImportError:  # the operator-only environment has no torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)

_PYTEST_INTERNALS = re.compile(r"[/\\](_pytest|pluggy)[/\\]")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Report a failure even when formatting its traceback hits CPython 3.11's AST race.

    Before 3.11.8 `ast.parse` keeps its recursion counter in interpreter-wide state, so a parse on another
    thread (kopf's, the engine's, a logged traceback's) can make the parse pytest does to show the failing
    source raise `SystemError: AST constructor recursion depth mismatch` (python/cpython#106905), which
    pytest turns into an INTERNALERROR that ends the run with no summary. Then the failure is reported
    from its raw frames instead, which needs no parsing.
    """
    try:
        return (yield)
    except SystemError as error:
        if "AST constructor recursion depth mismatch" not in str(error) or call.excinfo is None:
            raise
        return pytest.TestReport(
            item.nodeid,
            item.location,
            dict.fromkeys(item.keywords, 1),
            "failed",
            _unparsed_traceback(call.excinfo.value),
            call.when,  # type: ignore[arg-type]  # never "collect" here
            [(f"Captured {key} {when}", content) for when, key, content in item._report_sections],
            call.duration,
            call.start,
            call.stop,
            user_properties=item.user_properties,
        )


def _unparsed_traceback(error: BaseException) -> str:
    """The exception (first: the short summary shows the first line), then its traceback as
    `traceback.format_exception` prints it, less pytest's and pluggy's frames and the carets (finding them
    parses the source)."""
    summary = traceback.format_exception_only(type(error), error)
    lines = [summary[-1], "(the source is not shown: CPython's AST race hit pytest's formatter)\n"]
    lines.append("Traceback (most recent call last):\n")
    for frame in traceback.extract_tb(error.__traceback__):
        if _PYTEST_INTERNALS.search(frame.filename):
            continue
        lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n')
        if frame.line:
            lines.append(f"    {frame.line}\n")
    lines.extend(summary)
    return "".join(lines)
