"""A private copy of one of our Triton modules, imported on a fresh triton with TRITON_INTERPRET=1.

Triton decides between compiling and interpreting when `@triton.jit` runs, for its own library
functions (tl.cdiv, tl.max, ...) as much as for ours, i.e. when triton is imported. So this imports a
fresh triton and a private copy of the module with TRITON_INTERPRET=1, and puts the previous modules
and environment back afterwards: nothing interpreted leaks into other tests.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


def _is_triton_python_module(name: str) -> bool:
    # the compiled extension (triton._C) cannot be imported twice; it does not depend on the mode
    return (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")


@contextmanager
def interpreted(module_name: str) -> Iterator[ModuleType]:
    """`module_name` (e.g. "pagoda.attention.triton_backend") loaded under the Triton interpreter."""
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_modules = {n: sys.modules.pop(n) for n in list(sys.modules) if _is_triton_python_module(n)}
    name = "interpreted_" + module_name.replace(".", "_")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(name, importlib.util.find_spec(module_name).origin)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        fresh = {n: sys.modules.pop(n) for n in list(sys.modules) if _is_triton_python_module(n)}
        # Kept under other names, so interpreter shutdown tears them down before triton's extension
        # (modules dropped from sys.modules outlive it, and nanobind reports their objects as leaks).
        sys.modules.update({f"_interpreted_{n}": m for n, m in fresh.items()})
        sys.modules.update(saved_modules)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
