"""Pure builders for `pagoda router` in front of an LLMDeployment's engines (ARCHITECTURE.md §3b).

The Service named after the LLMDeployment selects the router pods; the routers find the serving engine
pods through the EndpointSlices of a headless `<name>-engines` Service, with RBAC to read EndpointSlices
in the namespace and nothing more. In gateway mode an InferencePool names the router as its endpoint
picker (Envoy's external-processing protocol on EPP_PORT).
"""

from __future__ import annotations

from typing import Any

from pagoda_operator import labels
from pagoda_operator.builders import (
    ENGINE_PORT,
    container_security_context,
    http_probe,
    pod_security_context,
)
from pagoda_operator.spec import LLMDeploymentSpec

EPP_PORT = 9002
INFERENCE_POOL_API = "inference.networking.k8s.io/v1"
# The router drops from the Service's endpoints before it stops; its open streams then finish.
ROUTER_PRESTOP_SLEEP_SECONDS = 5
DEFAULT_ROUTER_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def engines_service_name(name: str) -> str:
    return f"{name}-engines"


def router_name(name: str) -> str:
    return f"{name}-router"


def epp_service_name(name: str) -> str:
    return f"{name}-epp"


def router_metadata(name: str, namespace: str, object_name: str) -> dict[str, Any]:
    return {"name": object_name, "namespace": namespace, "labels": labels.router_labels(name)}


def router_args(name: str, spec: LLMDeploymentSpec) -> list[str]:
    router = spec.router
    args = [
        "--discovery-service",
        engines_service_name(name),
        "--discovery-port-name",
        "http",
        "--policy",
        router.policy,
        "--hold-timeout",
        str(router.hold_timeout_seconds),
        "--port",
        str(ENGINE_PORT),
    ]
    if router.gateway:
        args += ["--ext-proc-port", str(EPP_PORT)]
    return args


def router_resources(spec: LLMDeploymentSpec) -> dict[str, Any]:
    resources = {key: dict(value) for key, value in spec.router.resources.items()}
    return resources or {key: dict(value) for key, value in DEFAULT_ROUTER_RESOURCES.items()}


def router_container(name: str, spec: LLMDeploymentSpec, image: str) -> dict[str, Any]:
    ports = [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}]
    if spec.router.gateway:
        ports.append({"name": "grpc-epp", "containerPort": EPP_PORT, "protocol": "TCP"})
    return {
        "name": "router",
        "image": image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["pagoda", "router"],
        "args": router_args(name, spec),
        "ports": ports,
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": router_resources(spec),
        # /ready stays 200 while holding is on (scale from zero): the router takes requests and holds them.
        "readinessProbe": http_probe("/ready", 5, 3, 3),
        "livenessProbe": http_probe("/health", 10, 5, 3),
        "lifecycle": {"preStop": {"sleep": {"seconds": ROUTER_PRESTOP_SLEEP_SECONDS}}},
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def router_image(spec: LLMDeploymentSpec, engine_image: str, operator_router_image: str | None) -> str:
    """The spec's router image, else the operator's (the chart's routerImage), else the engine's: the
    server image holds `pagoda router`."""
    return spec.router.image or operator_router_image or spec.engine.image or engine_image


def build_router_deployment(
    name: str,
    namespace: str,
    spec: LLMDeploymentSpec,
    default_image: str,
    run_as_user: int | None,
    default_router_image: str | None = None,
) -> dict[str, Any]:
    """Stateless router replicas: no GPU, a rolling update that always keeps one up."""
    image = router_image(spec, default_image, default_router_image)
    pod_labels = labels.router_labels(name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": router_metadata(name, namespace, router_name(name)),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": labels.router_selector_labels(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ENGINE_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": router_name(name),
                    # The router watches EndpointSlices with its service account's token.
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": ROUTER_PRESTOP_SLEEP_SECONDS
                    + spec.engine.shutdown_timeout_seconds,
                    "securityContext": pod_security_context(run_as_user),
                    "containers": [router_container(name, spec, image)],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": labels.router_selector_labels(name)},
                        }
                    ],
                },
            },
        },
    }


def build_router_service_account(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": router_metadata(name, namespace, router_name(name)),
        "automountServiceAccountToken": False,  # only the router pods mount it, by their pod spec
    }


def build_router_role(name: str, namespace: str) -> dict[str, Any]:
    """Read EndpointSlices in this namespace, nothing more (discovery of the engine pods)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": router_metadata(name, namespace, router_name(name)),
        "rules": [
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["get", "list", "watch"],
            }
        ],
    }


def build_router_role_binding(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": router_metadata(name, namespace, router_name(name)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": router_name(name)},
        "subjects": [{"kind": "ServiceAccount", "name": router_name(name), "namespace": namespace}],
    }


def http_port() -> dict[str, Any]:
    return {
        "name": "http",
        "port": ENGINE_PORT,
        "targetPort": "http",
        "protocol": "TCP",
        "appProtocol": "http",
    }


def build_engines_service(name: str, namespace: str) -> dict[str, Any]:
    """Headless: its EndpointSlices list the serving engine pods for the routers, no virtual IP."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": engines_service_name(name),
            "namespace": namespace,
            "labels": labels.common_labels(name),
        },
        "spec": {
            "clusterIP": "None",
            "selector": {**labels.selector_labels(name), labels.SERVING: "true"},
            "ports": [http_port()],
        },
    }


def build_epp_service(name: str, namespace: str) -> dict[str, Any]:
    """The InferencePool's endpoint picker: the routers' ext-proc gRPC port."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": router_metadata(name, namespace, epp_service_name(name)),
        "spec": {
            "type": "ClusterIP",
            "selector": labels.router_selector_labels(name),
            "ports": [
                {
                    "name": "grpc-epp",
                    "port": EPP_PORT,
                    "targetPort": "grpc-epp",
                    "protocol": "TCP",
                    "appProtocol": "http2",
                }
            ],
        },
    }


def build_inference_pool(name: str, namespace: str) -> dict[str, Any]:
    """Gateway API Inference Extension: a gateway routes to the serving pods that the router picks."""
    return {
        "apiVersion": INFERENCE_POOL_API,
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": namespace, "labels": labels.common_labels(name)},
        "spec": {
            "selector": {"matchLabels": {**labels.selector_labels(name), labels.SERVING: "true"}},
            "targetPorts": [{"number": ENGINE_PORT}],
            "endpointPickerRef": {
                "name": epp_service_name(name),
                "kind": "Service",
                "port": {"number": EPP_PORT},
                # A gateway with no picker answering should not fail every request: Envoy falls back.
                "failureMode": "FailOpen",
            },
        },
    }


def build_router_pdb(name: str, namespace: str) -> dict[str, Any]:
    """Node drains take one router pod at a time: the Service always keeps one."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": router_metadata(name, namespace, router_name(name)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": labels.router_selector_labels(name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_router_children(
    name: str,
    namespace: str,
    spec: LLMDeploymentSpec,
    default_image: str,
    run_as_user: int | None,
    default_router_image: str | None = None,
) -> list[dict[str, Any]]:
    """What the router adds beside the engines; empty when the router is disabled."""
    if not spec.router.enabled:
        return []
    children = [
        build_router_service_account(name, namespace),
        build_router_role(name, namespace),
        build_router_role_binding(name, namespace),
        build_engines_service(name, namespace),
        build_router_deployment(name, namespace, spec, default_image, run_as_user, default_router_image),
        build_router_pdb(name, namespace),
    ]
    if spec.router.gateway:
        children += [build_epp_service(name, namespace), build_inference_pool(name, namespace)]
    return children


def router_child_names(name: str) -> list[tuple[str, str]]:
    """(kind, name) of every child build_router_children may return: what pruning looks for."""
    return [
        ("ServiceAccount", router_name(name)),
        ("Role", router_name(name)),
        ("RoleBinding", router_name(name)),
        ("Service", engines_service_name(name)),
        ("Deployment", router_name(name)),
        ("PodDisruptionBudget", router_name(name)),
        ("Service", epp_service_name(name)),
        ("InferencePool", name),
    ]
