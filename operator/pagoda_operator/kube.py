"""A small JSON client for the Kubernetes API over kubernetes_asyncio's transport and authentication.

The operator handles plain dicts (what the builders return), so it skips kubernetes_asyncio's model
classes: one generic get/list/create/patch/delete, addressed by apiVersion and plural.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from pagoda_operator.spec import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
# Server-side apply's owner of every field the operator sets on its children. Applying the whole desired
# manifest under one manager makes the API server drop whatever this manager set before and no longer
# sets (a merge patch would keep it), while fields other controllers own (an admission webhook's
# sidecar, a VPA's requests) stay theirs: a full replace would have to copy those back by hand.
FIELD_MANAGER = "pagoda-operator"
REQUEST_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Resource:
    api_version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{root}/namespaces/{namespace}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


LLMDEPLOYMENTS = Resource(f"{GROUP}/{VERSION}", PLURAL)
DEPLOYMENTS = Resource("apps/v1", "deployments")
SERVICES = Resource("v1", "services")
PODS = Resource("v1", "pods")
PVCS = Resource("v1", "persistentvolumeclaims")
HPAS = Resource("autoscaling/v2", "horizontalpodautoscalers")
PDBS = Resource("policy/v1", "poddisruptionbudgets")
EVENTS = Resource("v1", "events")
SERVICE_ACCOUNTS = Resource("v1", "serviceaccounts")
ROLES = Resource("rbac.authorization.k8s.io/v1", "roles")
ROLE_BINDINGS = Resource("rbac.authorization.k8s.io/v1", "rolebindings")
INFERENCE_POOLS = Resource("inference.networking.k8s.io/v1", "inferencepools")
RESOURCES_BY_KIND = {
    "ServiceAccount": SERVICE_ACCOUNTS,
    "Role": ROLES,
    "RoleBinding": ROLE_BINDINGS,
    "InferencePool": INFERENCE_POOLS,
    "Deployment": DEPLOYMENTS,
    "Service": SERVICES,
    "Pod": PODS,
    "PersistentVolumeClaim": PVCS,
    "HorizontalPodAutoscaler": HPAS,
    "PodDisruptionBudget": PDBS,
}


def resource_of(manifest: Mapping[str, Any]) -> Resource:
    return RESOURCES_BY_KIND[manifest["kind"]]


def matches_labels(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    obj_labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(obj_labels.get(key) == value for key, value in selector.items())


class KubeClient:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        return await self.api_client.call_api(
            path,
            method,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
            response_types_map={200: "object", 201: "object"},
            _return_http_data_only=True,
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )

    async def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", resource.path(namespace, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    async def list(
        self, resource: Resource, namespace: str, selector: Mapping[str, str]
    ) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        result = await self._call("GET", resource.path(namespace), query=[("labelSelector", label_selector)])
        # Filter here too: the selector is the contract, whatever the server did with it.
        return [item for item in result.get("items") or [] if matches_labels(item, selector)]

    async def events_about(self, namespace: str, kind: str, reasons: Collection[str]) -> list[dict[str, Any]]:
        """Core events on objects of `kind` with one of `reasons` (the server filters by kind)."""
        query = [("fieldSelector", f"involvedObject.kind={kind}")]
        result = await self._call("GET", EVENTS.path(namespace), query=query)
        return [
            event
            for event in result.get("items") or []
            if event.get("reason") in reasons and (event.get("involvedObject") or {}).get("kind") == kind
        ]

    async def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        namespace = manifest["metadata"]["namespace"]
        return await self._call("POST", resource_of(manifest).path(namespace), body=dict(manifest))

    async def patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch: maps merge, lists are replaced whole (a template's containers become ours)."""
        return await self._call(
            "PATCH", resource.path(namespace, name, subresource), body=dict(body), content_type=MERGE_PATCH
        )

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: create the object, or make the operator's fields exactly `manifest`'s.

        `force` takes over fields another manager last wrote (a hand edit with kubectl): the operator's
        spec is the source of truth for everything it sets.
        """
        meta = manifest["metadata"]
        return await self._call(
            "PATCH",
            resource_of(manifest).path(meta["namespace"], meta["name"]),
            body=dict(manifest),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type=APPLY_PATCH,
        )

    async def delete(self, resource: Resource, namespace: str, name: str) -> bool:
        try:
            await self._call("DELETE", resource.path(namespace, name))
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True


async def load_configuration() -> client.Configuration:
    """In-cluster service account first, else $KUBECONFIG / ~/.kube/config (read now, not at import)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        kubeconfig = os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0]
        await config.load_kube_config(
            config_file=os.path.expanduser(kubeconfig), client_configuration=configuration
        )
    return configuration


async def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials for kopf's own client: both talk to one cluster as one user."""
    header = configuration.get_api_key_with_prefix("BearerToken")
    if inspect.isawaitable(header):
        header = await header
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )
