"""An hf:// branch resolved to a commit once (revision.py): against the Hub emulation (hub_testkit.py),
through the builders, and the reconciler's pin step with a recording stand-in for the API client."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import kubernetes_validate
import pytest
from hub_testkit import COMMIT, REPO, TOKEN, FakeHub

from pagoda_operator import builders, reconcile, revision
from pagoda_operator.revision import Backoff, PinnedRevision, RevisionUnresolved
from pagoda_operator.spec import parse_spec
from pagoda_operator.status import merge_patch_is_noop

OTHER_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_hf_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def hf_spec(revision_: str | None = None, env: list[dict[str, Any]] | None = None) -> Any:
    model: dict[str, Any] = {"source": f"hf://{REPO}"}
    if revision_ is not None:
        model["revision"] = revision_
    return parse_spec({"model": model, "engine": {"env": env or []}})


# ------------------------------------------------------------------------------------------ which specs


@pytest.mark.parametrize(
    ("model", "resolves"),
    [
        ({"source": f"hf://{REPO}"}, True),  # main
        ({"source": f"hf://{REPO}", "revision": "v1.0"}, True),
        ({"source": f"hf://{REPO}", "revision": "refs/pr/1"}, True),
        ({"source": f"hf://{REPO}", "revision": COMMIT}, False),
        ({"source": f"hf://{REPO}", "revision": COMMIT[:12]}, True),  # a short id may be a branch name
        ({"source": "builtin://smollm2-135m-instruct"}, False),
        ({"source": "pvc://weights/llama"}, False),
        ({"source": "s3://bucket/llama/"}, False),
    ],
)
def test_only_branches_and_tags_of_hf_sources_are_resolved(model: dict[str, Any], resolves: bool) -> None:
    assert revision.needs_resolution(parse_spec({"model": model}).model) is resolves


# ------------------------------------------------------------------------------------------- the Hub


def test_resolves_a_branch_and_a_tag_on_the_hub(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    assert revision.resolve(hf_spec()) == PinnedRevision(f"hf://{REPO}", "main", COMMIT)
    hub.refs["v1.0"] = OTHER_COMMIT
    assert revision.resolve(hf_spec("v1.0")).commit == OTHER_COMMIT
    assert [r.path for r in hub.requests] == [
        f"/api/models/{REPO}/revision/main",
        f"/api/models/{REPO}/revision/v1.0",
    ]


def test_the_pods_hub_endpoint_wins_and_the_operators_token_is_sent(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetcher in the pods reads HF_ENDPOINT from spec.engine.env: the operator asks the same Hub."""
    hub.require_token = True
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the operator's own: not used here
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    spec = hf_spec(env=[{"name": "HF_ENDPOINT", "value": hub.endpoint + "/"}])
    assert revision.resolve(spec).commit == COMMIT
    (seen,) = hub.requests
    assert seen.headers.get("Authorization") == f"Bearer {TOKEN}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("setup", "revision_", "expected"),
    [
        ("private", None, "HTTP 401"),
        ("missing", "no-such-branch", "HTTP 404"),
        ("outage", None, "HTTP 503"),
        ("offline", None, "refused"),
    ],
)
def test_failures_name_the_revision_and_the_cause(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, setup: str, revision_: str | None, expected: str
) -> None:
    hub.require_token = setup == "private"
    hub.api_failure = 503 if setup == "outage" else None
    endpoint = f"http://127.0.0.1:{closed_port()}" if setup == "offline" else hub.endpoint
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(RevisionUnresolved) as raised:
        revision.resolve(hf_spec(revision_))
    message = str(raised.value)
    assert f"hf://{REPO}@{revision_ or 'main'}" in message and expected in message
    assert "spec.model.revision to a commit" in message
    if setup == "private":
        assert "HF_TOKEN" in message


# ---------------------------------------------------------------------------------------- the builders


def test_the_pods_fetch_and_load_the_pinned_commit() -> None:
    spec = revision.with_commit(hf_spec(), COMMIT)
    deployment = builders.build_deployment("m", "ml", spec)
    kubernetes_validate.validate(deployment, "1.32.0", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["command"][fetch["command"].index("--revision") + 1] == COMMIT
    # fetch.py's layout, written out: one cache directory per commit, never per branch name.
    assert pod["containers"][0]["args"][0] == f"/models/hf/{REPO}/{COMMIT}"
    assert "main" not in str(pod)


def test_model_status() -> None:
    spec = hf_spec()
    assert revision.model_status(spec.model, revision.with_commit(spec, COMMIT).model) == {
        "source": f"hf://{REPO}",
        "revision": "main",
        "resolvedRevision": COMMIT,
    }
    builtin = parse_spec({"model": {"source": "builtin://smollm2-135m-instruct"}}).model
    # None: a merge patch removes what an earlier hf:// source left in the status.
    assert revision.model_status(builtin, builtin) == {
        "source": "builtin://smollm2-135m-instruct",
        "revision": None,
        "resolvedRevision": None,
    }


def test_a_pin_is_kept_for_its_source_and_revision_only() -> None:
    pin = PinnedRevision(f"hf://{REPO}", "main", COMMIT)
    body = {"metadata": pin.annotation_patch["metadata"]}
    assert PinnedRevision.pinned(body) == pin
    assert pin.pins(hf_spec().model) and pin.pins(hf_spec("main").model)
    assert not pin.pins(hf_spec("v1.0").model)
    assert not pin.pins(parse_spec({"model": {"source": "hf://other/model"}}).model)
    for broken in ("{not json", '{"source": "x"}', '{"source": "x", "revision": "main", "commit": "main"}'):
        assert PinnedRevision.pinned({"metadata": {"annotations": {revision.ANNOTATION: broken}}}) is None


def test_backoff_doubles_to_a_cap() -> None:
    backoff = Backoff(base=10, cap=600)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 7, 50)] == [10, 20, 40, 80, 600, 600]


def test_merge_patch_is_noop_sees_nested_removals() -> None:
    current = {"model": {"source": "hf://a/b", "resolvedRevision": COMMIT}, "replicas": 1}
    assert merge_patch_is_noop(current, {"model": {"source": "hf://a/b", "revision": None}, "replicas": 1})
    assert not merge_patch_is_noop(current, {"model": {"source": "builtin://x", "resolvedRevision": None}})
    assert not merge_patch_is_noop(current, {"model": {"resolvedRevision": None}})
    assert not merge_patch_is_noop(current, {"replicas": 2})


# ---------------------------------------------------------------------------- the reconciler's pin step


class RecordingClient:
    """Stands in for kube.KubeClient: pin_revision only patches the LLMDeployment."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    async def patch(self, resource: Any, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(body)
        return body


def llmd(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "ml", "annotations": annotations or {}}, "spec": spec}


def test_the_reconciler_pins_once_and_backs_off(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(reconcile, "announce", lambda *args, **kwargs: None)  # events need kopf running
    client = RecordingClient()
    reconciler = reconcile.Reconciler(client, Backoff(base=3600))  # type: ignore[arg-type]
    raw = {"model": {"source": f"hf://{REPO}"}}
    spec = parse_spec(raw)

    served = asyncio.run(reconciler.pin_revision(llmd(raw), spec))
    assert served.model.revision == COMMIT and served.model.source == spec.model.source
    (patch,) = client.patches
    assert PinnedRevision.pinned(patch) == PinnedRevision(f"hf://{REPO}", "main", COMMIT)

    hub.refs["main"] = OTHER_COMMIT  # pinned: the moved branch is not looked at again
    served = asyncio.run(reconciler.pin_revision(llmd(raw, patch["metadata"]["annotations"]), spec))
    assert served.model.revision == COMMIT and len(hub.requests) == 1 and len(client.patches) == 1

    # A revision the Hub does not know: the failure is remembered, the next call within the back-off
    # does not ask the Hub again; a fixed spec (another revision) asks at once.
    missing = {"model": {"source": f"hf://{REPO}", "revision": "gone"}}
    for _ in range(2):
        with pytest.raises(RevisionUnresolved, match="HTTP 404"):
            asyncio.run(reconciler.pin_revision(llmd(missing), parse_spec(missing)))
    assert len(hub.requests) == 2
    tag = {"model": {"source": f"hf://{REPO}", "revision": "v3"}}
    hub.refs["v3"] = OTHER_COMMIT
    assert asyncio.run(reconciler.pin_revision(llmd(tag), parse_spec(tag))).model.revision == OTHER_COMMIT

    # A commit needs no Hub; leaving the branch drops the stale pin.
    pinned_commit = {"model": {"source": f"hf://{REPO}", "revision": COMMIT}}
    annotated = llmd(pinned_commit, patch["metadata"]["annotations"])
    served = asyncio.run(reconciler.pin_revision(annotated, parse_spec(pinned_commit)))
    assert served.model.revision == COMMIT and len(hub.requests) == 3
    assert client.patches[-1] == revision.REMOVE_ANNOTATION_PATCH
