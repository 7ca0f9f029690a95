"""Idempotent reconciliation of one LLMDeployment: children, pod roles, status, and the builtin autoscaler.

Every entry point takes the object's current body, can run any number of times, and converges: it creates
what is missing, patches what drifted, and writes the status only when it changed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kopf
from kubernetes_asyncio.client.exceptions import ApiException

from pagoda_operator import autoscaler, builders, kube, labels, revision, router_builders
from pagoda_operator.autoscaler import scrape_port, to_rfc3339, window_from_status
from pagoda_operator.defaults import OperatorDefaults
from pagoda_operator.revision import Backoff, PinnedRevision, Retries, RevisionUnresolved
from pagoda_operator.spec import InvalidSpecError, LLMDeploymentSpec, parse_spec
from pagoda_operator.status import (
    VOLUME_FAILURE_REASONS,
    Condition,
    base_status,
    find_condition,
    merge_conditions,
    merge_patch_is_noop,
    problems_of,
    readiness_conditions,
    scaling_condition,
    utc_now,
    with_router,
)
from pagoda_operator.warmpool import is_ready, plan_pod_roles, serving_ready_pods, summarize_pool

RETRY_DELAY_SECONDS = 30
# A claim may wait for its first pod (WaitForFirstConsumer) or a slow provisioner: unbound after this
# long, it is reported as Degraded.
CLAIM_BIND_GRACE_SECONDS = 120
# The scrape port when a pod has no prometheus.io/port annotation (the engine's port).
DEFAULT_METRICS_PORT = 8000


class Reconciler:
    """Holds the API client and one lock per LLMDeployment, so a timer, a spec change and a pod event
    never reconcile the same object at the same time."""

    def __init__(self, client: kube.KubeClient, revision_backoff: Backoff | None = None) -> None:
        self.client = client
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._warned: dict[tuple[str, str], tuple[str, str]] = {}  # the last Degraded problem warned about
        self._revision_retries = Retries(revision_backoff or Backoff())

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    # ------------------------------------------------------------------------------------------ entry points

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        """Children, pod roles and status; an invalid spec only sets Degraded (old pods serve on)."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        async with self.lock(namespace, name):
            # kopf's copy may predate a status written by a pod event or the autoscaler a moment ago.
            body = await self.client.get(kube.LLMDEPLOYMENTS, namespace, name) or body
            try:
                spec = parse_spec(body.get("spec") or {})
            except InvalidSpecError as err:
                await self.report_invalid_spec(body, str(err))
                return
            self._warned.pop((namespace, name), None)
            try:
                try:
                    served = await self.pin_revision(body, spec)
                except RevisionUnresolved as err:
                    await self.report_unresolved(body, str(err))
                    return
                pods = await self.sync_pod_roles(body, spec)
                await self.apply_children(body, served, await self.pin_defaults(body))
                await self.write_status(body, spec, pods, revision.model_status(spec.model, served.model))
            except ApiException as err:
                message = (
                    f"the API server refused a change: {err.status} {err.reason}: {api_error_message(err)}"
                )
                await self.report_degraded(body, "ApplyFailed", message)
                raise kopf.TemporaryError(message, delay=RETRY_DELAY_SECONDS) from err

    async def on_pod_event(self, namespace: str, name: str) -> None:
        """A pod turned ready, unready or went away: re-balance the roles and refresh the counts."""
        async with self.lock(namespace, name):
            body = await self.client.get(kube.LLMDEPLOYMENTS, namespace, name)
            if body is None:
                return
            try:
                spec = parse_spec(body.get("spec") or {})
            except InvalidSpecError:
                return  # reported by reconcile(); pods keep their roles until the spec is fixed
            pods = await self.sync_pod_roles(body, spec)
            await self.write_status(body, spec, pods)

    async def autoscale(self, namespace: str, name: str, metrics_port: int = DEFAULT_METRICS_PORT) -> None:
        """One builtin-autoscaler tick: scrape the serving pods, decide, write spec.replicas if it changes."""
        async with self.lock(namespace, name):
            body = await self.client.get(kube.LLMDEPLOYMENTS, namespace, name)
            if body is None:
                return
            try:
                spec = parse_spec(body.get("spec") or {})
            except InvalidSpecError:
                return
            if not spec.builtin_autoscaling_enabled:
                return
            pods = await self.client.list(kube.PODS, namespace, labels.selector_labels(name))
            serving = serving_ready_pods(pods)
            targets = [(p["status"]["podIP"], scrape_port(p, metrics_port)) for p in serving]
            loads = await autoscaler.scrape_pods(targets)
            policy = spec.autoscaling
            missing = len(targets) - len(loads)
            recommendation = autoscaler.recommend_with_missing(loads, missing, spec.replicas, policy)
            pending = (
                await self.router_pending(namespace, name, metrics_port) if spec.router.enabled else None
            )
            recommendation = autoscaler.recommend_with_router(
                recommendation, loads, pending, spec.replicas, policy
            )
            status = body.get("status") or {}
            window = window_from_status(status.get("autoscaler") or {})
            decision = autoscaler.decide_scale(
                spec.replicas, len(serving), recommendation, policy, window, time.time()
            )
            await self.write_autoscaler_status(body, decision, loads, missing)
            if decision.replicas != spec.replicas:
                # through the scale subresource, as an HPA would: RBAC can grant it apart from the spec
                await self.client.patch(
                    kube.LLMDEPLOYMENTS,
                    namespace,
                    name,
                    {"spec": {"replicas": decision.replicas}},
                    subresource="scale",
                )
                announce(
                    body,
                    reason="ScaledUp" if decision.replicas > spec.replicas else "ScaledDown",
                    message=decision.message,
                )

    async def router_pending(self, namespace: str, name: str, metrics_port: int) -> float | None:
        """The requests the ready router pods hold for want of a ready engine; None when none answered."""
        pods = await self.client.list(kube.PODS, namespace, labels.router_selector_labels(name))
        targets = [(p["status"]["podIP"], scrape_port(p, metrics_port)) for p in pods if is_ready(p)]
        pending = await autoscaler.scrape_pods(targets, autoscaler.parse_router_pending)
        return sum(pending) if pending else None

    # ------------------------------------------------------------------------------------------ steps

    async def report_invalid_spec(self, body: Mapping[str, Any], message: str) -> None:
        await self.report_degraded(
            body,
            "InvalidSpec",
            message,
            Condition(
                "Progressing",
                False,
                "InvalidSpec",
                "not applying this spec; the pods of the last valid spec keep serving",
            ),
        )

    async def report_unresolved(self, body: Mapping[str, Any], message: str) -> None:
        await self.report_degraded(
            body,
            "RevisionUnresolved",
            message,
            Condition(
                "Progressing",
                False,
                "RevisionUnresolved",
                "no pods roll onto a branch not pinned to a commit; the current pods keep serving",
            ),
        )

    async def report_degraded(
        self, body: Mapping[str, Any], reason: str, message: str, *more: Condition
    ) -> None:
        """Degraded=True with a message for the user; one warning event per problem, not per retry."""
        status = body.get("status") or {}
        existing = status.get("conditions") or []
        degraded = find_condition(existing, "Degraded")
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        # The status catches a restart of the operator; the memo catches a status written a moment ago.
        in_status = (
            degraded is not None
            and degraded.get("status") == "True"
            and (degraded.get("reason"), degraded.get("message")) == (reason, message)
        )
        if self._warned.get(key) != (reason, message) and not in_status:
            kopf.warn(body, reason=reason, message=message)  # type: ignore[arg-type]
        self._warned[key] = (reason, message)
        generation = body["metadata"].get("generation")
        conditions = merge_conditions(
            existing, [Condition("Degraded", True, reason, message), *more], utc_now(), generation
        )
        await self.patch_status(
            body,
            {
                "conditions": conditions,
                **({"observedGeneration": generation} if generation is not None else {}),
            },
        )

    async def sync_pod_roles(self, body: Mapping[str, Any], spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
        """Label exactly spec.replicas ready pods serving, before the Deployment changes size."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        pods = await self.client.list(kube.PODS, namespace, labels.selector_labels(name))
        for patch in plan_pod_roles(pods, spec.replicas):
            try:
                await self.client.patch(kube.PODS, namespace, patch.name, patch.body)
            except ApiException as err:
                if err.status == 404:
                    continue  # deleted meanwhile; its event brings us back with the new picture
                raise
            if patch.promotes:
                announce(body, reason="Promoted", message=f"pod {patch.name} joined the Service")
            elif patch.demotes:
                announce(body, reason="Demoted", message=f"pod {patch.name} left the Service and drains")
        return pods

    async def pin_defaults(self, body: Mapping[str, Any]) -> OperatorDefaults:
        """The operator's defaults pinned for this spec generation; pins the current ones on a new one."""
        generation = body["metadata"].get("generation")
        pinned = OperatorDefaults.pinned(body)
        if pinned is not None and pinned.generation == generation:
            return pinned
        current = OperatorDefaults.current(generation)
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        await self.client.patch(kube.LLMDEPLOYMENTS, namespace, name, current.annotation_patch)
        return current

    async def pin_revision(self, body: Mapping[str, Any], spec: LLMDeploymentSpec) -> LLMDeploymentSpec:
        """The spec the pods are built from: an hf:// branch or tag replaced by the commit pinned for it,
        resolved on the Hub once per source and revision (see revision.py). Raises RevisionUnresolved."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        key = (namespace, name)
        pinned = PinnedRevision.pinned(body)
        if not revision.needs_resolution(spec.model):
            self._revision_retries.forget(key)
            if revision.ANNOTATION in (body["metadata"].get("annotations") or {}):
                # A later return to a branch resolves it afresh, not to a stale pin.
                unpin = revision.REMOVE_ANNOTATION_PATCH
                await self.client.patch(kube.LLMDEPLOYMENTS, namespace, name, unpin)
            return spec
        if pinned is not None and pinned.pins(spec.model):
            return revision.with_commit(spec, pinned.commit)
        if (message := self._revision_retries.not_due(key, spec.model)) is not None:
            raise RevisionUnresolved(message)  # no Hub call before the back-off allows one
        try:
            pinned = await asyncio.to_thread(revision.resolve, spec)
        except RevisionUnresolved as err:
            self._revision_retries.failed(key, spec.model, str(err))
            raise
        self._revision_retries.forget(key)
        await self.client.patch(kube.LLMDEPLOYMENTS, namespace, name, pinned.annotation_patch)
        announce(
            body,
            reason="RevisionPinned",
            message=f"{pinned.source}@{pinned.revision} is commit {pinned.commit}: every pod serves it "
            "until spec.model changes",
        )
        return revision.with_commit(spec, pinned.commit)

    async def apply_children(
        self, body: Mapping[str, Any], spec: LLMDeploymentSpec, defaults: OperatorDefaults
    ) -> None:
        name = body["metadata"]["name"]
        manifests = child_manifests(body, spec, defaults)
        for manifest in manifests:
            # A claim's spec is immutable once bound (only its size may grow): create it, never patch it.
            action = await self.apply(manifest, create_only=manifest["kind"] == "PersistentVolumeClaim")
            if action is not None:
                announce(
                    body,
                    reason=action,
                    message=f"{action.lower()} {manifest['kind']} {manifest['metadata']['name']}",
                )
        if not spec.hpa_enabled and await self.delete_owned(kube.HPAS, body):
            announce(
                body,
                reason="Deleted",
                message=f"deleted HorizontalPodAutoscaler {name}: autoscaling "
                f"mode is {spec.autoscaling.mode}, enabled={spec.autoscaling.enabled}",
            )
        await self.prune_router_children(body, manifests)

    async def prune_router_children(
        self, body: Mapping[str, Any], manifests: Sequence[Mapping[str, Any]]
    ) -> None:
        """Delete the router's children the spec no longer asks for (router disabled, gateway mode off):
        server-side apply updates what is applied, it never removes a whole object."""
        desired = {(m["kind"], m["metadata"]["name"]) for m in manifests}
        for kind, child in router_builders.router_child_names(body["metadata"]["name"]):
            if (kind, child) in desired:
                continue
            if await self.delete_owned(kube.RESOURCES_BY_KIND[kind], body, child):
                announce(body, reason="Deleted", message=f"deleted {kind} {child}: not in the router's spec")

    async def apply(self, manifest: dict[str, Any], create_only: bool = False) -> str | None:
        """Server-side apply the manifest; returns what it did, None when the object was already so."""
        resource = kube.resource_of(manifest)
        meta = manifest["metadata"]
        live = await self.client.get(resource, meta["namespace"], meta["name"])
        if live is None:
            await self.client.apply(manifest)
            return "Created"
        if create_only:
            return None
        applied = await self.client.apply(manifest)
        return "Updated" if without_bookkeeping(applied) != without_bookkeeping(live) else None

    async def delete_owned(
        self, resource: kube.Resource, body: Mapping[str, Any], child: str | None = None
    ) -> bool:
        """Delete a child (by default the one named after the LLMDeployment) only if this LLMDeployment
        owns it (never a user's object with the same name)."""
        namespace = body["metadata"]["namespace"]
        name = child or body["metadata"]["name"]
        live = await self.client.get(resource, namespace, name)
        owners = (live or {}).get("metadata", {}).get("ownerReferences") or []
        if not any(ref.get("uid") == body["metadata"].get("uid") for ref in owners):
            return False
        return await self.client.delete(resource, namespace, name)

    async def write_status(
        self,
        body: Mapping[str, Any],
        spec: LLMDeploymentSpec,
        pods: Sequence[Mapping[str, Any]],
        model: Mapping[str, Any] | None = None,
    ) -> None:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        generation = body["metadata"].get("generation")
        pool = summarize_pool(pods, spec.replicas)
        existing = (body.get("status") or {}).get("conditions") or []
        deployment = await self.client.get(kube.DEPLOYMENTS, namespace, name)
        claim = (
            await self.client.get(kube.PVCS, namespace, builders.cache_claim_name(name))
            if spec.cache.enabled
            else None
        )
        # Only while some pod is not ready: a healthy pool costs no event listing.
        events = (
            await self.client.events_about(namespace, "Pod", VOLUME_FAILURE_REASONS) if pool.loading else []
        )
        problems = problems_of(pods, deployment, claim, time.time(), CLAIM_BIND_GRACE_SECONDS, events)
        updates = readiness_conditions(spec.replicas, pool, spec.replicas + spec.warm_pool_size, problems)
        routers_ready = None
        if spec.router.enabled:
            routers = await self.client.list(kube.PODS, namespace, labels.router_selector_labels(name))
            routers_ready = sum(1 for pod in routers if is_ready(pod))
            updates[0] = with_router(updates[0], routers_ready, spec.router.replicas)
        hpa = await self.client.get(kube.HPAS, namespace, name) if spec.hpa_enabled else None
        updates.append(scaling_condition(spec, existing, hpa))
        status = base_status(name, namespace, generation, spec.replicas, pool)
        status["routerReadyReplicas"] = routers_ready
        if model is not None:  # None: keep what the last full reconcile wrote (a pod event knows no commit)
            status["model"] = dict(model)
        status["conditions"] = merge_conditions(existing, updates, utc_now(), generation)
        await self.patch_status(body, status)

    async def write_autoscaler_status(
        self,
        body: Mapping[str, Any],
        decision: autoscaler.ScaleDecision,
        loads: Sequence[autoscaler.PodLoad],
        missing: int,
    ) -> None:
        status = body.get("status") or {}
        active = decision.reason != "NoMetrics"
        unanswered = f"; {missing} serving pod(s) missed the scrape (counted at target)" if missing else ""
        condition = Condition("ScalingActive", active, decision.reason, decision.message + unanswered)
        window = decision.window
        scaled = decision.reason in ("ScaleUp", "ScaleDown", "OutOfBounds")
        previous = status.get("autoscaler") or {}
        autoscaler_status = {
            "waitingRequests": sum(load.waiting for load in loads),
            "kvCacheUsage": round(sum(load.kv_cache_usage for load in loads), 6),
            "recommendedReplicas": decision.recommendation,
            "aboveSince": to_rfc3339(window.above_since),
            "belowSince": to_rfc3339(window.below_since),
            "windowPeak": window.window_peak,
            "waitingSince": to_rfc3339(window.waiting_since),
            "lastScaleTime": to_rfc3339(time.time()) if scaled else previous.get("lastScaleTime"),
        }
        conditions = merge_conditions(
            status.get("conditions") or [], [condition], utc_now(), body["metadata"].get("generation")
        )
        await self.patch_status(body, {"autoscaler": autoscaler_status, "conditions": conditions})

    async def patch_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        """Write the status subresource, skipping the call when nothing would change."""
        if merge_patch_is_noop(body.get("status") or {}, status):
            return
        meta = body["metadata"]
        await self.client.patch(
            kube.LLMDEPLOYMENTS, meta["namespace"], meta["name"], {"status": status}, subresource="status"
        )


def child_manifests(
    body: Mapping[str, Any], spec: LLMDeploymentSpec, defaults: OperatorDefaults
) -> list[dict[str, Any]]:
    """Every child the LLMDeployment asks for, owned by it: what the operator applies."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    manifests = [
        builders.build_deployment(name, namespace, spec, defaults.engine_image, defaults.run_as_user),
        builders.build_service(name, namespace, router=spec.router.enabled),
        builders.build_pdb(name, namespace),
        *router_builders.build_router_children(
            name, namespace, spec, defaults.engine_image, defaults.run_as_user, defaults.router_image
        ),
    ]
    if spec.hpa_enabled:
        manifests.append(builders.build_hpa(name, namespace, spec))
    if spec.cache.enabled:
        manifests.append(builders.build_cache_pvc(name, namespace, spec))
    kopf.adopt(manifests, owner=body)  # type: ignore[arg-type]
    return manifests


def announce(body: Mapping[str, Any], reason: str, message: str) -> None:
    """A Normal event on the LLMDeployment (kopf.info would drop it: the posting level is WARNING)."""
    kopf.event(body, type="Normal", reason=reason, message=message)  # type: ignore[arg-type]


def api_error_message(err: ApiException) -> str:
    """The Status message the API server sent, else its raw body."""
    try:
        return str(json.loads(err.body).get("message") or err.body)
    except (TypeError, ValueError, AttributeError):
        return str(err.body)


def without_bookkeeping(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object minus what moves without the operator (status) and on every write (resourceVersion)."""
    meta = {
        k: v
        for k, v in (obj.get("metadata") or {}).items()
        if k not in ("resourceVersion", "managedFields", "generation")
    }
    return {**{k: v for k, v in obj.items() if k != "status"}, "metadata": meta}
