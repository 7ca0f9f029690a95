"""Label and annotation names shared by the builders, the warm pool and the handlers (ARCHITECTURE.md §4)."""

from __future__ import annotations

NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
MANAGED_BY = "app.kubernetes.io/managed-by"
SERVING = "pagoda.dev/serving"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
COMPONENT = "app.kubernetes.io/component"

APP_NAME = "pagoda"
# The router's pods carry another name, so that no engine selector (Deployment, PDB, warm pool) sees them.
ROUTER_APP_NAME = "pagoda-router"
MANAGER = "pagoda-operator"


def selector_labels(name: str) -> dict[str, str]:
    """The Deployment's selector: it never holds the serving label, so flipping that never orphans a pod."""
    return {NAME: APP_NAME, INSTANCE: name}


def common_labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), MANAGED_BY: MANAGER}


def serving_selector(name: str) -> str:
    """The scale subresource's selector (status.selector): the pods in the Service, which an HPA averages."""
    labels = {**selector_labels(name), SERVING: "true"}
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def router_selector_labels(name: str) -> dict[str, str]:
    return {NAME: ROUTER_APP_NAME, INSTANCE: name}


def router_labels(name: str) -> dict[str, str]:
    return {**router_selector_labels(name), COMPONENT: "router", MANAGED_BY: MANAGER}
