"""An hf:// branch or tag pinned to one commit per LLMDeployment.

A branch (`main`, the default) moves: pods that fetched it at different times would serve different
commits, and a rescheduled pod would quietly pick up a new model. So the operator asks the Hub once which
commit the branch names, when the LLMDeployment is first reconciled and again only when
`spec.model.source` or `spec.model.revision` changes, and pins the answer in an annotation on the object
(as it pins its other defaults, see defaults.py). The pods fetch and serve that commit (`pagoda-fetch
--revision <commit>`, a cache path per commit). A full 40-hex commit in the spec needs no Hub call.

When the Hub cannot answer (no network, a private repository without a token, a missing branch), nothing
rolls: the pods of the last pinned commit keep serving, the LLMDeployment reports `Degraded` with reason
`RevisionUnresolved`, and the operator asks again with a growing back-off. Rolling pods onto the moving
branch instead would bring back the mixed commits this exists to prevent. To move to a branch's new head,
remove the annotation (`kubectl annotate llmd NAME pagoda.dev/model-revision-`) or name the commit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagoda_operator.fetch import (
    DEFAULT_HF_ENDPOINT,
    FetchError,
    ModelSource,
    hf_repo_id,
    is_commit,
    resolve_hf_revision,
)
from pagoda_operator.spec import GROUP, LLMDeploymentSpec, ModelSpec

ANNOTATION = f"{GROUP}/model-revision"
DEFAULT_REVISION = "main"
# The operator's own call: short, since it holds the LLMDeployment's reconcile lock meanwhile.
HUB_TIMEOUT_SECONDS = 10.0


class RevisionUnresolved(Exception):
    """The Hub did not name a commit for the spec's branch or tag; the message says why."""


def needs_resolution(model: ModelSpec) -> bool:
    return model.scheme == "hf" and not is_commit(model.revision)


@dataclass(frozen=True)
class PinnedRevision:
    """The commit `source@revision` named when it was resolved."""

    source: str
    revision: str
    commit: str

    @classmethod
    def pinned(cls, body: Mapping[str, Any]) -> PinnedRevision | None:
        """The pin on the object, None when absent or unreadable (a hand edit): then it is resolved anew."""
        raw = ((body.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
        try:
            found = json.loads(raw) if raw else None
            pinned = cls(**found) if isinstance(found, dict) else None
        except (TypeError, ValueError):
            return None
        return pinned if pinned is not None and is_commit(pinned.commit) else None

    def pins(self, model: ModelSpec) -> bool:
        """Whether this pin was made for the spec's source and revision."""
        return (self.source, self.revision) == (model.source, model.revision or DEFAULT_REVISION)

    @property
    def annotation_patch(self) -> dict[str, Any]:
        value = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return {"metadata": {"annotations": {ANNOTATION: value}}}


REMOVE_ANNOTATION_PATCH = {"metadata": {"annotations": {ANNOTATION: None}}}


def with_commit(spec: LLMDeploymentSpec, commit: str) -> LLMDeploymentSpec:
    """The spec the pods are built from: the commit in place of the branch, so the fetcher downloads it
    and the engine loads it from a cache path of its own."""
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, revision=commit))


def model_status(model: ModelSpec, served: ModelSpec) -> dict[str, Any]:
    """status.model: what the spec asks for and the commit the pods serve (None removes a stale key)."""
    hf = model.scheme == "hf"
    return {
        "source": model.source,
        "revision": (model.revision or DEFAULT_REVISION) if hf else None,
        "resolvedRevision": served.revision if hf and is_commit(served.revision) else None,
    }


def hub_access(spec: LLMDeploymentSpec) -> tuple[str, str | None]:
    """The Hub endpoint and token: the pods' own HF_ENDPOINT when the spec sets it as a value (the
    fetcher must reach the same Hub), else the operator's environment, as pagoda-fetch reads it. A token
    from a Secret the operator cannot read (it holds no Secret rights): the chart's huggingface.tokenSecret
    gives the operator its own."""
    values = {item.get("name"): item.get("value") for item in spec.engine.env if item.get("value")}
    endpoint = values.get("HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT
    token = values.get("HF_TOKEN") or os.environ.get("HF_TOKEN") or None
    return endpoint.rstrip("/"), token


def resolve(spec: LLMDeploymentSpec) -> PinnedRevision:
    """Ask the Hub (blocking: run it in a thread) which commit the spec's branch or tag names now."""
    model = spec.model
    revision = model.revision or DEFAULT_REVISION
    endpoint, token = hub_access(spec)
    try:
        repo_id = hf_repo_id(ModelSource.parse(model.source))
        commit = resolve_hf_revision(repo_id, revision, endpoint, token, HUB_TIMEOUT_SECONDS)
    except (FetchError, OSError) as err:
        raise RevisionUnresolved(
            f"cannot resolve {model.source}@{revision} to a commit: {err}; the pods keep their current "
            "commit and the operator retries with back-off (or set spec.model.revision to a commit)"
        ) from None
    return PinnedRevision(model.source, revision, commit)


@dataclass(frozen=True)
class Backoff:
    """Delays between Hub calls for one unresolved revision: base, 2 x base, ... up to `cap` seconds."""

    base: float = 10.0
    cap: float = 600.0

    def delay(self, failures: int) -> float:
        return float(min(self.base * 2 ** max(failures - 1, 0), self.cap))


@dataclass(frozen=True)
class FailedResolution:
    """The last failure for one LLMDeployment's source@revision, kept until the next try is due."""

    source: str
    revision: str
    failures: int
    retry_at: float  # time.monotonic()
    message: str

    def for_model(self, model: ModelSpec) -> bool:
        return (self.source, self.revision) == (model.source, model.revision or DEFAULT_REVISION)


class Retries:
    """Failed resolutions per LLMDeployment, so that the Hub is asked again only as the back-off allows
    (at once for another source or revision). In memory: a restarted operator asks at once."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self._failed: dict[tuple[str, str], FailedResolution] = {}

    def not_due(self, key: tuple[str, str], model: ModelSpec) -> str | None:
        """The last failure's message while the next try for this model is not due, else None."""
        failed = self._failed.get(key)
        if failed is not None and failed.for_model(model) and time.monotonic() < failed.retry_at:
            return failed.message
        return None

    def failed(self, key: tuple[str, str], model: ModelSpec, message: str) -> None:
        previous = self._failed.get(key)
        failures = previous.failures + 1 if previous is not None and previous.for_model(model) else 1
        self._failed[key] = FailedResolution(
            model.source,
            model.revision or DEFAULT_REVISION,
            failures,
            time.monotonic() + self.backoff.delay(failures),
            message,
        )

    def forget(self, key: tuple[str, str]) -> None:
        self._failed.pop(key, None)
