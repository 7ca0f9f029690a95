"""An hf:// branch pinned to one commit per LLMDeployment, end to end: kopf and the operator against the
kmock emulator, resolving revisions on the Hub emulation (hub_testkit.py, HF_ENDPOINT set by conftest).

Before, the pods fetched `main` by name: pods started on either side of a push served different commits.
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest
from hub_testkit import COMMIT, REPO, TOKEN, FakeHub
from llmd_testkit import (
    DEPLOYMENTS,
    LLMD_RESOURCE,
    NAMESPACE,
    SERVICES,
    api_call,
    api_path,
    condition,
    create_llmd,
    obj,
    posted_events,
    schema_errors,
    status,
    wait_for,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

NEXT_COMMIT = "9" * 40  # what `main` names after a push
TAG_COMMIT = "7" * 40
MODEL_API = f"/api/models/{REPO}/revision/"


def served_commit(kube: kmock.KubernetesEmulator, name: str) -> str | None:
    """The commit the pods fetch and load: the fetcher's --revision, which the engine's model path
    (`/models/hf/<repo>/<commit>`) must name as well."""
    pod = (obj(kube, DEPLOYMENTS, name) or {}).get("spec", {}).get("template", {}).get("spec")
    if not pod:
        return None
    (fetch,) = pod["initContainers"]
    commit = fetch["command"][fetch["command"].index("--revision") + 1]
    assert pod["containers"][0]["args"][0] == f"/models/hf/{REPO}/{commit}"
    return str(commit)


async def patch_spec(kube: Any, name: str, generation: int, spec: dict[str, Any]) -> Any:
    """A spec change; the emulator does not bump the generation as an API server would."""
    body = {"metadata": {"generation": generation}, "spec": spec}
    return await api_call(kube, "PATCH", api_path("llmdeployments", name), body)


async def test_a_branch_is_resolved_once_and_every_pod_serves_that_commit(
    operator: kmock.KubernetesEmulator, hub: FakeHub
) -> None:
    kube = operator
    await create_llmd(kube, "pin", {"model": {"source": f"hf://{REPO}"}})  # revision: main by default
    await wait_for(lambda: served_commit(kube, "pin") == COMMIT)
    current = await wait_for(lambda: status(kube, "pin").get("model"))
    assert current == {"source": f"hf://{REPO}", "revision": "main", "resolvedRevision": COMMIT}
    assert schema_errors(obj(kube, LLMD_RESOURCE, "pin")) == []  # type: ignore[arg-type]
    assert len(hub.requests_to(MODEL_API)) == 1
    await wait_for(lambda: posted_events(kube, "RevisionPinned"))

    # `main` moves on. Neither the periodic reconcile nor a spec change outside the model re-resolves it.
    hub.refs["main"] = NEXT_COMMIT
    await patch_spec(kube, "pin", 2, {"engine": {"maxModelLen": 2048}})
    await wait_for(lambda: "--max-model-len" in obj(kube, DEPLOYMENTS, "pin")["spec"]["template"]["spec"][
        "containers"][0]["args"])
    await api_call(kube, "DELETE", f"/api/v1/namespaces/{NAMESPACE}/services/pin")
    await wait_for(lambda: obj(kube, SERVICES, "pin"), timeout=10)  # a periodic reconcile ran
    assert served_commit(kube, "pin") == COMMIT
    assert len(hub.requests_to(MODEL_API)) == 1, "resolved once, not per reconcile"

    # A new revision is resolved anew: a tag, then a commit id (which needs no Hub call).
    hub.refs["v2"] = TAG_COMMIT
    await patch_spec(kube, "pin", 3, {"model": {"revision": "v2"}})
    await wait_for(lambda: served_commit(kube, "pin") == TAG_COMMIT)
    await wait_for(lambda: status(kube, "pin")["model"]["resolvedRevision"] == TAG_COMMIT)
    await patch_spec(kube, "pin", 4, {"model": {"revision": NEXT_COMMIT}})
    await wait_for(lambda: served_commit(kube, "pin") == NEXT_COMMIT)
    await wait_for(lambda: status(kube, "pin")["model"] == {
        "source": f"hf://{REPO}", "revision": NEXT_COMMIT, "resolvedRevision": NEXT_COMMIT})
    assert len(hub.requests_to(MODEL_API)) == 2
    # Back to the branch: resolved again, to where it is now.
    await patch_spec(kube, "pin", 5, {"model": {"revision": None}})
    await wait_for(lambda: status(kube, "pin")["model"].get("revision") == "main")
    assert served_commit(kube, "pin") == NEXT_COMMIT
    assert status(kube, "pin")["model"]["resolvedRevision"] == NEXT_COMMIT


def degraded(kube: kmock.KubernetesEmulator, name: str) -> dict[str, Any]:
    found = condition(kube, name, "Degraded")
    return found if found.get("status") == "True" else {}


async def test_an_unresolvable_revision_rolls_nothing_and_is_retried(
    operator: kmock.KubernetesEmulator, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube = operator
    hub.api_failure = 503  # the Hub is down when the LLMDeployment is created
    await create_llmd(kube, "hold", {"model": {"source": f"hf://{REPO}"}})
    found = await wait_for(lambda: degraded(kube, "hold"))
    assert found["reason"] == "RevisionUnresolved"
    assert f"hf://{REPO}@main" in found["message"] and "HTTP 503" in found["message"]
    assert condition(kube, "hold", "Progressing")["reason"] == "RevisionUnresolved"
    assert obj(kube, DEPLOYMENTS, "hold") is None, "no pods on an unpinned branch"
    await wait_for(lambda: len(hub.requests_to(MODEL_API)) >= 3, timeout=15)  # retried (0.5 s, 1 s, ...)
    assert len(posted_events(kube, "RevisionUnresolved")) == 1, "one warning, not one per retry"

    hub.api_failure = None  # back up: the next retry pins the commit and creates the pods
    await wait_for(lambda: served_commit(kube, "hold") == COMMIT, timeout=15)
    await wait_for(lambda: condition(kube, "hold", "Degraded").get("status") == "False")

    # A private repository without the operator's token, on a running LLMDeployment: its pods stay.
    hub.require_token = True
    await patch_spec(kube, "hold", 2, {"model": {"revision": "v2"}})
    found = await wait_for(lambda: degraded(kube, "hold"))
    assert found["reason"] == "RevisionUnresolved" and "HF_TOKEN" in found["message"]
    assert served_commit(kube, "hold") == COMMIT
    assert status(kube, "hold")["model"]["resolvedRevision"] == COMMIT  # what the pods serve

    # The chart's huggingface.tokenSecret gives the operator HF_TOKEN; the tag exists by now.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.refs["v2"] = TAG_COMMIT
    await wait_for(lambda: served_commit(kube, "hold") == TAG_COMMIT, timeout=15)
    (last,) = hub.requests_to(MODEL_API)[-1:]
    assert last.headers.get("Authorization") == f"Bearer {TOKEN}"
