"""Label and annotation names shared by the builders, the warm pool and the handlers (ARCHITECTURE.md §4)."""

from __future__ import annotations

NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
MANAGED_BY = "app.kubernetes.io/managed-by"
SERVING = "pagoda.dev/serving"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

APP_NAME = "pagoda"
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
