"""The router's manifests (ARCHITECTURE.md §3b): valid against the real Kubernetes schemas, flags the real
`pagoda router` parser accepts, selectors that keep router and engine pods apart, RBAC that reads
EndpointSlices and nothing more, and in gateway mode an InferencePool of the v1 API's shape."""

from __future__ import annotations

import argparse
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from llmd_testkit import router_pod

from pagoda.router.main import add_router_arguments
from pagoda_operator import builders, labels, router_builders
from pagoda_operator.spec import InvalidSpecError, parse_spec

K8S_VERSION = "1.32.0"
NS = "ml"
BUILTIN = {"source": "builtin://smollm2-135m-instruct"}
IMAGE = "registry/pagoda:2"

# The fields of inference.networking.k8s.io/v1 InferencePool the operator writes, as the v1 API reference
# documents them (selector.matchLabels, at most one target port, an endpoint picker Service and its port).
INFERENCE_POOL_V1 = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "targetPorts", "endpointPickerRef"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["matchLabels"],
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "minProperties": 1,
                            "additionalProperties": {"type": "string", "maxLength": 63},
                        }
                    },
                },
                "targetPorts": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["number"],
                        "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}},
                    },
                },
                "endpointPickerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "port"],
                    "properties": {
                        "group": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "port": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["number"],
                            "properties": {"number": {"type": "integer", "minimum": 1, "maximum": 65535}},
                        },
                        "failureMode": {"enum": ["FailOpen", "FailClose"]},
                    },
                },
            },
        },
    },
}


def children(raw: dict[str, Any], name: str = "demo") -> dict[tuple[str, str], dict[str, Any]]:
    spec = parse_spec(raw)
    built = router_builders.build_router_children(name, NS, spec, IMAGE, 10001)
    return {(m["kind"], m["metadata"]["name"]): m for m in built}


def router_args(deployment: dict[str, Any]) -> argparse.Namespace:
    """The container's arguments through the real `pagoda router` parser (an unknown flag exits)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["pagoda", "router"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_router_arguments(parser)
    return parser.parse_args(container["args"])


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], pod: dict[str, str]) -> bool:
    return selector.items() <= pod.items()


@pytest.mark.parametrize("mode", ["service", "gateway"])
def test_router_children_are_valid_kubernetes_objects(mode: str) -> None:
    built = children({"model": BUILTIN, "router": {"mode": mode}})
    for (kind, _), manifest in built.items():
        if kind == "InferencePool":
            jsonschema.validate(manifest, INFERENCE_POOL_V1)
        else:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    assert ("InferencePool", "demo") in built if mode == "gateway" else ("InferencePool", "demo") not in built


def test_the_inference_pool_schema_catches_a_wrong_shape() -> None:
    """Guard: the structural check above can fail (the pre-v1 field names)."""
    pool = children({"model": BUILTIN, "router": {"mode": "gateway"}})[("InferencePool", "demo")]
    pool["spec"]["targetPortNumber"] = 8000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, INFERENCE_POOL_V1)


def test_router_runs_with_flags_the_router_parser_accepts() -> None:
    built = children(
        {
            "model": BUILTIN,
            "router": {"policy": "least-load", "holdTimeoutSeconds": 120, "replicas": 3},
        }
    )
    deployment = built[("Deployment", "demo-router")]
    args = router_args(deployment)
    assert args.discovery_service == "demo-engines"
    assert args.discovery_port_name == "http"
    assert args.policy == "least-load"
    assert args.hold_timeout == 120
    assert args.port == 8000 and args.ext_proc_port is None
    assert deployment["spec"]["replicas"] == 3
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE  # the engine's image: the server image holds `pagoda router`
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"] == router_builders.DEFAULT_ROUTER_RESOURCES
    template = deployment["spec"]["template"]["spec"]
    assert template["serviceAccountName"] == "demo-router"
    assert template["automountServiceAccountToken"] is True


def test_router_image_and_resources_come_from_the_spec() -> None:
    resources = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    built = children(
        {
            "model": BUILTIN,
            "engine": {"image": "registry/engine:1"},
            "router": {"image": "registry/router:1", "resources": resources},
        }
    )
    (container,) = built[("Deployment", "demo-router")]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry/router:1"
    assert container["resources"] == resources
    engine_only = children({"model": BUILTIN, "engine": {"image": "registry/engine:1"}})
    (container,) = engine_only[("Deployment", "demo-router")]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry/engine:1"


def test_gateway_mode_serves_the_endpoint_picker_and_points_the_pool_at_it() -> None:
    built = children({"model": BUILTIN, "router": {"mode": "gateway"}})
    deployment = built[("Deployment", "demo-router")]
    assert router_args(deployment).ext_proc_port == 9002
    epp = built[("Service", "demo-epp")]
    assert selects(epp["spec"]["selector"], pod_labels(deployment))
    (port,) = epp["spec"]["ports"]
    assert port["port"] == 9002
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": port["targetPort"], "containerPort": 9002, "protocol": "TCP"} in container["ports"]
    pool = built[("InferencePool", "demo")]["spec"]
    assert pool["endpointPickerRef"]["name"] == "demo-epp"
    assert pool["endpointPickerRef"]["port"] == {"number": 9002}
    assert pool["targetPorts"] == [{"number": 8000}]
    engine_pod = pod_labels(builders.build_deployment("demo", NS, parse_spec({"model": BUILTIN})))
    assert selects(pool["selector"]["matchLabels"], engine_pod)  # serving engines, born serving
    assert not selects(pool["selector"]["matchLabels"], {**engine_pod, labels.SERVING: "false"})
    assert not selects(pool["selector"]["matchLabels"], pod_labels(deployment))


def test_services_and_selectors_keep_router_and_engine_pods_apart() -> None:
    spec = parse_spec({"model": BUILTIN})
    engines = builders.build_deployment("demo", NS, spec)
    built = children({"model": BUILTIN})
    router = built[("Deployment", "demo-router")]
    service = builders.build_service("demo", NS, router=True)
    headless = built[("Service", "demo-engines")]
    assert selects(service["spec"]["selector"], pod_labels(router))
    assert not selects(service["spec"]["selector"], pod_labels(engines))
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], pod_labels(engines))
    assert not selects(headless["spec"]["selector"], {**pod_labels(engines), labels.SERVING: "false"})
    assert not selects(headless["spec"]["selector"], pod_labels(router))
    # The engines' Deployment, PDB and the warm pool's pod listing never see a router pod, and back.
    assert not selects(engines["spec"]["selector"]["matchLabels"], pod_labels(router))
    assert not selects(router["spec"]["selector"]["matchLabels"], pod_labels(engines))
    assert pod_labels(router)[labels.COMPONENT] == "router"
    assert router_pod("demo")["metadata"]["labels"] == pod_labels(router)  # the e2e tests' stand-in
    # Disabled: today's layout, the Service selects the serving engines directly.
    assert builders.build_service("demo", NS)["spec"]["selector"] == headless["spec"]["selector"]


def test_router_rbac_reads_endpointslices_in_its_namespace_and_nothing_more() -> None:
    built = children({"model": BUILTIN})
    role = built[("Role", "demo-router")]
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = built[("RoleBinding", "demo-router")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "demo-router",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-router", "namespace": NS}]
    assert ("ServiceAccount", "demo-router") in built


def test_disabled_router_builds_nothing_and_pruning_knows_every_child() -> None:
    assert children({"model": BUILTIN, "router": {"enabled": False}}) == {}
    every = children({"model": BUILTIN, "router": {"mode": "gateway"}})
    assert set(every) == set(router_builders.router_child_names("demo"))


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"router": {"policy": "random"}}, "spec.router.policy"),
        ({"router": {"mode": "mesh"}}, "spec.router.mode"),
        ({"router": {"replicas": 0}}, "spec.router.replicas"),
        ({"router": {"holdTimeoutSeconds": -1}}, "spec.router.holdTimeoutSeconds"),
        (
            {"router": {"enabled": False}, "autoscaling": {"enabled": True, "minReplicas": 0}},
            "minReplicas 0 needs spec.router.enabled",
        ),
        (
            {"router": {"holdTimeoutSeconds": 0}, "autoscaling": {"enabled": True, "minReplicas": 0}},
            "minReplicas 0 needs spec.router.holdTimeoutSeconds",
        ),
    ],
)
def test_parse_spec_rejects_router_settings_it_cannot_honour(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidSpecError, match=fragment):
        parse_spec({"model": BUILTIN, **raw})


def test_scale_to_zero_is_valid_with_the_router() -> None:
    spec = parse_spec({"model": BUILTIN, "autoscaling": {"enabled": True, "minReplicas": 0}})
    assert spec.autoscaling.min_replicas == 0 and spec.router.enabled


@pytest.mark.parametrize(
    ("router", "engine", "chart_router", "expected"),
    [
        ("r:spec", "e:spec", "r:chart", "r:spec"),
        (None, "e:spec", "r:chart", "r:chart"),  # the chart's routerImage over a custom engine build
        (None, "e:spec", None, "e:spec"),
        (None, None, None, IMAGE),  # the chart's engine image
    ],
)
def test_router_image_precedence(
    router: str | None, engine: str | None, chart_router: str | None, expected: str
) -> None:
    raw: dict[str, Any] = {"model": BUILTIN, "router": {"image": router} if router else {}}
    if engine:
        raw["engine"] = {"image": engine}
    deployment = router_builders.build_router_deployment(
        "demo", NS, parse_spec(raw), IMAGE, None, chart_router
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == expected
