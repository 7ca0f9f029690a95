"""Fixtures for the operator tests: kopf running against the kmock Kubernetes API emulator.

kmock keeps objects in memory and serves list/watch/get/create/patch/delete for them. It assigns no uid,
resourceVersion or creationTimestamp, applies no CRD defaults and runs no controllers: the tests create
the pods a Deployment would have, and flip their readiness themselves.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

# Short intervals, read when pagoda_operator.handlers is imported (below).
os.environ.setdefault("PAGODA_RECONCILE_INTERVAL_SECONDS", "2")
os.environ.setdefault("PAGODA_AUTOSCALE_INTERVAL_SECONDS", "0.5")
os.environ.setdefault("PAGODA_REVISION_RETRY_SECONDS", "0.5")

import kmock  # noqa: E402
from applying_emulator import ApplyingEmulator  # noqa: E402
from hub_testkit import FakeHub, serve_hub  # noqa: E402
from llmd_testkit import LLMD_RESOURCE, NAMESPACE, load_crd, running_operator  # noqa: E402

import pagoda_operator.handlers  # noqa: E402, F401  (registers the handlers)


@pytest.fixture()
def hub() -> Iterator[FakeHub]:
    """The Hugging Face Hub emulation (hub_testkit.py) on localhost."""
    with serve_hub() as state:
        yield state


@pytest.fixture()
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    """kmock's emulator, plus server-side apply (which the operator applies its children with)."""
    return {**kmock_options, "cls": ApplyingEmulator}


@pytest_asyncio.fixture()
async def kube(
    kmock: kmock.KubernetesEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub
) -> AsyncIterator[kmock.KubernetesEmulator]:
    """The emulator with the built-in resources, our CRD, a namespace, and a kubeconfig pointing at it;
    the operator resolves hf:// revisions on the Hub emulation, never on the network."""
    kmock.resources.load_bundled()
    names = load_crd()["spec"]["names"]
    kmock.resources[LLMD_RESOURCE] = kmock.ResourceInfo(
        kind=names["kind"],
        singular=names["singular"],
        namespaced=True,
        shortnames=set(names["shortNames"]),
        subresources={"status", "scale"},
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    )
    kmock.objects["v1/namespaces", None, NAMESPACE] = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "uid": "ns-uid"},
    }
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield kmock


@pytest_asyncio.fixture()
async def operator(kube: kmock.KubernetesEmulator) -> AsyncIterator[kmock.KubernetesEmulator]:
    """The operator (llmd_testkit.running_operator) against the emulator, for the whole test."""
    async with running_operator():
        yield kube
