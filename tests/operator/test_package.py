"""Importing `pagoda_operator` is side-effect free: no kopf handlers registered, no environment read.

Checked in a fresh interpreter, since the other tests import `pagoda_operator.handlers` on purpose.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import os, pkgutil, importlib
import aiohttp, kopf, kubernetes_asyncio.client, kubernetes_asyncio.config, prometheus_client, yaml

registry = kopf.get_default_registry()
parts = ("_activities", "_indexing", "_watching", "_spawning", "_changing", "_webhooks")
def handler_count():
    return sum(len(list(getattr(registry, part).get_all_handlers())) for part in parts)

read = []
class Spy(os._Environ):
    def __getitem__(self, key):
        read.append(key)
        return super().__getitem__(key)
before = handler_count()
os.environ = Spy(os.environ._data, os.environ.encodekey, os.environ.decodekey,
                 os.environ.encodevalue, os.environ.decodevalue)
import pagoda_operator
for module in pkgutil.iter_modules(pagoda_operator.__path__):
    if module.name != "handlers":
        importlib.import_module(f"pagoda_operator.{module.name}")
assert "pagoda_operator.handlers" not in __import__("sys").modules, "the package imported its handlers"
assert handler_count() == before, "importing pagoda_operator registered kopf handlers"
assert read == [], f"importing pagoda_operator read the environment: {read}"
import pagoda_operator.handlers
assert handler_count() > before  # the probe can see a registration
print("ok")
"""


def test_importing_the_package_registers_nothing_and_reads_no_environment() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_operator_replicas_draw_distinct_peering_priorities() -> None:
    """kopf pauses every operator when two peers share a priority: the chart's replicas must not."""
    import kopf

    from pagoda_operator import handlers

    priorities = set()
    for _ in range(5):
        settings = kopf.OperatorSettings()
        handlers.configure(settings=settings)
        priorities.add(settings.peering.priority)
    assert len(priorities) == 5 and min(priorities) > 0
