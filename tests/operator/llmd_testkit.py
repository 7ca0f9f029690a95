"""Helpers shared by the operator tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonschema
import kmock
import kopf
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = REPO_ROOT / "crds" / "llmdeployments.pagoda.dev.yaml"
EXAMPLES_DIR = REPO_ROOT / "examples"
NAMESPACE = "ml"
LLMD_RESOURCE = "pagoda.dev/v1alpha1/llmdeployments"
PODS = "v1/pods"
SERVING = "pagoda.dev/serving"
DEPLOYMENTS = "apps/v1/deployments"
SERVICES = "v1/services"
PDBS = "policy/v1/poddisruptionbudgets"
PVCS = "v1/persistentvolumeclaims"
BUILTIN = {"source": "builtin://smollm2-135m-instruct"}


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def crd_schema() -> dict[str, Any]:
    return load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Violations of the CRD's OpenAPI v3 schema (JSON-Schema draft 4: boolean exclusiveMinimum), and
    fields it does not declare (the API server would silently prune those)."""
    validator = jsonschema.Draft4Validator(crd_schema())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return errors + [f"{path}: not declared in the CRD" for path in undeclared_fields(crd_schema(), doc)]


def undeclared_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key in schema["properties"]:
                found += undeclared_fields(schema["properties"][key], item, f"{path}.{key}")
            else:
                found.append(f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += undeclared_fields(schema["additionalProperties"], item, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += undeclared_fields(schema["items"], item, f"{path}[{i}]")
    return found


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until `predicate()` (awaited if it returns an awaitable) is truthy and return it, or fail after
    `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except (KeyError, IndexError, TypeError):
            value = None
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        await asyncio.sleep(interval)


def llmd_object(name: str, spec: dict[str, Any], uid: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "pagoda.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": uid or f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": spec,
    }


def api_path(kind: str, name: str | None = None, subresource: str | None = None) -> str:
    """The REST path of a namespaced object in NAMESPACE: kind is llmdeployments, pods, ..."""
    roots = {"llmdeployments": "/apis/pagoda.dev/v1alpha1", "pods": "/api/v1", "deployments": "/apis/apps/v1"}
    path = f"{roots[kind]}/namespaces/{NAMESPACE}/{kind}"
    return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")


async def api_call(kube: Any, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A request to the emulator over HTTP, as kubectl would make it (so watchers see the change)."""
    content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
    async with kube.request(method, path, json=body, headers={"Content-Type": content_type}) as response:
        assert response.status < 300, (response.status, await response.text())
        return await response.json()


def obj(kube: kmock.KubernetesEmulator, resource: str, name: str) -> dict[str, Any] | None:
    try:
        stored = kube.objects[resource, NAMESPACE, name]
    except KeyError:
        return None
    return None if stored.deleted else stored.raw


def status(kube: kmock.KubernetesEmulator, name: str) -> dict[str, Any]:
    return (obj(kube, LLMD_RESOURCE, name) or {}).get("status") or {}


def condition(kube: kmock.KubernetesEmulator, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(kube, name).get("conditions") or [] if c["type"] == type_), {})


def serving_pods(kube: kmock.KubernetesEmulator, names: list[str]) -> set[str]:
    """The pods the Service's endpoints hold: selected by the serving label, and ready."""
    found = set()
    for name in names:
        pod = obj(kube, PODS, name) or {}
        labelled = (pod.get("metadata", {}).get("labels") or {}).get(SERVING) == "true"
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (pod.get("status") or {}).get("conditions") or []
        )
        if labelled and ready:
            found.add(name)
    return found


async def create_llmd(kube: kmock.KubernetesEmulator, name: str, spec: dict[str, Any]) -> None:
    await api_call(kube, "POST", api_path("llmdeployments"), llmd_object(name, spec))


def fake_pod(
    instance: str, name: str, *, ready: bool, created: str, ip: str = "10.0.0.1", metrics_port: int = 8000
) -> dict[str, Any]:
    """An engine pod as the Deployment's replica set would create it (kmock runs no controllers)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "resourceVersion": "1",
            "creationTimestamp": created,
            "labels": {
                "app.kubernetes.io/name": "pagoda",
                "app.kubernetes.io/instance": instance,
                "app.kubernetes.io/managed-by": "pagoda-operator",
                "pagoda.dev/serving": "true",  # as the Deployment's template has it
            },
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port)},
        },
        "spec": {"containers": [{"name": "engine", "image": "pagoda"}]},
        "status": pod_status(ready, ip),
    }


def router_pod(instance: str, port: int = 8000, ready: bool = True) -> dict[str, Any]:
    """A router pod as its Deployment would create it, labelled as the operator's builder labels it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{instance}-router-0",
            "namespace": NAMESPACE,
            "uid": f"uid-{instance}-router-0",
            "labels": {
                "app.kubernetes.io/name": "pagoda-router",
                "app.kubernetes.io/instance": instance,
                "app.kubernetes.io/component": "router",
                "app.kubernetes.io/managed-by": "pagoda-operator",
            },
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)},
        },
        "spec": {"containers": [{"name": "router", "image": "pagoda"}]},
        "status": pod_status(ready, "127.0.0.1"),
    }


def pod_status(ready: bool, ip: str = "10.0.0.1") -> dict[str, Any]:
    return {
        "phase": "Running",
        "podIP": ip,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }


def posted_events(kube: Any, reason: str) -> list[dict[str, Any]]:
    """Events the operator posted with this reason (kopf POSTs them to the core events API)."""
    return [
        r.data
        for r in list(kube)
        if r.method == kmock.method.POST
        and r.url.path.endswith("/events")
        and isinstance(r.data, dict)
        and r.data.get("reason") == reason
    ]


STOP_TIMEOUT_SECONDS = 60


@contextlib.asynccontextmanager
async def running_operator(peering: str | None = None) -> AsyncIterator[None]:
    """`kopf run -m pagoda_operator.handlers --all-namespaces --standalone` in a thread, on its own loop,
    stopped gracefully on exit; a test may run one after another against the same emulator (a restart).
    With `peering`, `--peering=NAME` instead of `--standalone`, as the chart runs it.

    Not a task on the test's loop: on exit kopf cancels every task left in its loop, the test's included.
    The handlers register on import (conftest imports them once the test intervals are set).
    """
    from pagoda_operator.handlers import current_reconciler

    stop = threading.Event()
    loop = asyncio.new_event_loop()
    settings = kopf.OperatorSettings()
    # At exit kopf lets workers drain queued events for exit_timeout (2 s), racing its own daemon killer:
    # an event handled after the killer re-spawns a timer that then holds the exit for kopf's fixed 5 s
    # grace. The tests' last events matter to nobody, so the queues get 0.1 s; the stop stays graceful.
    settings.queueing.exit_timeout = 0.1
    task = loop.create_task(
        kopf.operator(
            standalone=peering is None,
            peering_name=peering,
            clusterwide=True,
            stop_flag=stop,
            settings=settings,
        )
    )
    thread = threading.Thread(target=_run_until_stopped, args=(loop, task), name="kopf", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        # Wait off the loop (the emulator on this loop must keep answering while kopf shuts down) and
        # never cancel: kopf's graceful stop runs the cleanup handler, then gives leftover tasks their own
        # time. The bound only keeps a hung operator from hanging the suite; a healthy stop takes far less.
        await asyncio.to_thread(thread.join, STOP_TIMEOUT_SECONDS)
    assert not thread.is_alive(), f"the operator did not stop within {STOP_TIMEOUT_SECONDS} s"
    assert current_reconciler() is None, "the cleanup handler did not run"


def _run_until_stopped(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(task)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
