"""kopf handlers: thin wrappers that hand the object to the Reconciler.

Importing this module (and only this one) registers them: `kopf run -m pagoda_operator.handlers
--all-namespaces --standalone` runs the operator. kopf fixes a timer's interval when the decorator runs,
so the intervals are read from the environment here, at import (the chart sets them; tests shorten them).
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import kopf

from pagoda_operator import kube, labels
from pagoda_operator.reconcile import DEFAULT_METRICS_PORT, Reconciler
from pagoda_operator.revision import Backoff
from pagoda_operator.spec import GROUP, PLURAL, VERSION, InvalidSpecError, parse_spec

LLMD = (GROUP, VERSION, PLURAL)
RECONCILE_INTERVAL_SECONDS = float(os.environ.get("PAGODA_RECONCILE_INTERVAL_SECONDS", "30"))
AUTOSCALE_INTERVAL_SECONDS = float(os.environ.get("PAGODA_AUTOSCALE_INTERVAL_SECONDS", "15"))
METRICS_PORT = int(os.environ.get("PAGODA_METRICS_PORT", str(DEFAULT_METRICS_PORT)))
# The first wait before asking the Hub again about a revision it could not resolve (doubles, to 10 min).
REVISION_RETRY_SECONDS = float(os.environ.get("PAGODA_REVISION_RETRY_SECONDS", "10"))

_reconciler: Reconciler | None = None
# Clients replaced by a re-login; closed at cleanup, since calls may still be in flight on them.
_retired_clients: list[kube.KubeClient] = []


def current_reconciler() -> Reconciler | None:
    """None before the first login and after cleanup (kopf may still fire a timer while stopping)."""
    return _reconciler


def reconciler() -> Reconciler:
    if _reconciler is None:
        raise kopf.TemporaryError("not logged in to the API server yet", delay=5)
    return _reconciler


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # All of the operator's own marks on objects live under pagoda.dev; nothing under status.kopf.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Events are posted explicitly (kopf.event / kopf.warn); handler logs at INFO stay in the logs.
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING
    # The chart runs replicas that meet on a kopf peering object: the highest priority works, the others
    # stand by. Equal priorities would pause them all, so each replica draws its own.
    settings.peering.priority = random.SystemRandom().randrange(1, 2**31)
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    # Pod events come from the API server already filtered to the engine pods this operator manages:
    # without a selector every pod event in the watched namespaces would cross the wire to be dropped here.
    settings.watching.label_selectors["v1", "pods"] = f"{labels.MANAGED_BY}={labels.MANAGER}"
    # A deleted LLMDeployment keeps its finalizer until its timers have exited; kopf re-checks a timer that
    # was mid-run (a periodic reconcile) only this often (default 60 s): deletion would wait that long.
    settings.background.cancellation_polling = 2
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    """One set of credentials for kopf's watches and for the operator's own API client."""
    global _reconciler
    configuration = await kube.load_configuration()
    client = kube.KubeClient(kube.client.ApiClient(configuration))
    if _reconciler is None:
        _reconciler = Reconciler(client, Backoff(base=REVISION_RETRY_SECONDS))
    else:  # re-authentication (e.g. a rotated token): keep the per-object locks, swap the client
        _retired_clients.append(_reconciler.client)
        _reconciler.client = client
    return await kube.connection_info(configuration)


@kopf.on.cleanup()
async def close_clients(**_: Any) -> None:
    global _reconciler
    clients = _retired_clients + ([_reconciler.client] if _reconciler is not None else [])
    _reconciler = None
    _retired_clients.clear()
    for client in clients:
        await client.api_client.close()


@kopf.on.resume(*LLMD)
@kopf.on.create(*LLMD)
@kopf.on.update(*LLMD, field="spec")
async def reconcile_on_change(body: kopf.Body, **_: Any) -> None:
    await reconciler().reconcile(body)


@kopf.timer(*LLMD, interval=RECONCILE_INTERVAL_SECONDS, initial_delay=RECONCILE_INTERVAL_SECONDS)
async def reconcile_periodically(body: kopf.Body, **_: Any) -> None:
    """Repairs drift nobody announced (a deleted Service, a hand-edited Deployment)."""
    if (found := current_reconciler()) is not None:
        await found.reconcile(body)


@kopf.on.event("v1", "pods", labels={labels.MANAGED_BY: labels.MANAGER, labels.INSTANCE: kopf.PRESENT})
async def pod_changed(meta: kopf.Meta, namespace: str, **_: Any) -> None:
    """Promotes warm pods the moment one is needed and ready: seconds, not a cold start."""
    if (found := current_reconciler()) is not None:  # else the periodic reconcile catches up
        await found.on_pod_event(namespace, meta["labels"][labels.INSTANCE])


def uses_builtin_autoscaler(spec: kopf.Spec, **_: Any) -> bool:
    """The spec's own test, so the timer and the tick never disagree; an invalid spec scales nothing."""
    try:
        return parse_spec(spec).builtin_autoscaling_enabled
    except InvalidSpecError:
        return False


@kopf.timer(*LLMD, interval=AUTOSCALE_INTERVAL_SECONDS, when=uses_builtin_autoscaler)
async def autoscale(name: str, namespace: str, **_: Any) -> None:
    if (found := current_reconciler()) is not None:
        await found.autoscale(namespace, name, METRICS_PORT)
