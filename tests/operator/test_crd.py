"""The CRD against the real apiextensions.k8s.io/v1 schema; the examples against the CRD's own schema.

What the API server would do to a custom resource is reproduced with independent implementations:
`jsonschema` (OpenAPI v3 is JSON-Schema draft 4 with boolean exclusiveMinimum) for the types, ranges and
enums; `celpy` (cel-python) for the `x-kubernetes-validations` CEL rules, after structural defaulting.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from llmd_testkit import EXAMPLES_DIR, crd_schema, load_crd, schema_errors

from pagoda_operator.spec import parse_spec

K8S_VERSION = "1.32.0"
EXAMPLES = sorted(EXAMPLES_DIR.glob("llmdeployment*.yaml"))


def load_example(path: Any) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: absent properties of present objects get defaults."""
    if isinstance(value, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                value[key] = apply_defaults(prop, value[key])
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def rules_with_values(schema: dict[str, Any], value: Any) -> Iterator[tuple[dict[str, str], Any]]:
    """Every CEL rule that applies to `value`, with the value `self` stands for there."""
    for rule in schema.get("x-kubernetes-validations") or []:
        yield rule, value
    if isinstance(value, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if key in value:
                yield from rules_with_values(prop, value[key])
    if isinstance(value, list) and "items" in schema:
        for item in value:
            yield from rules_with_values(schema["items"], item)


def cel_failures(doc: dict[str, Any]) -> list[str]:
    schema = crd_schema()
    defaulted = apply_defaults(schema, copy.deepcopy(doc))
    env = celpy.Environment()
    failures = []
    for rule, value in rules_with_values(schema, defaulted):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            failures.append(rule["message"])
    return failures


def custom_resource(spec: dict[str, Any], name: str = "demo") -> dict[str, Any]:
    return {
        "apiVersion": "pagoda.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": spec,
    }


BUILTIN = {"source": "builtin://smollm2-135m-instruct"}


def test_crd_is_a_valid_apiextensions_v1_custom_resource_definition() -> None:
    kubernetes_validate.validate(load_crd(), K8S_VERSION, strict=True)


def test_crd_names_and_subresources_follow_the_contract() -> None:
    crd = load_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "llmdeployments.pagoda.dev"
    assert (spec["group"], spec["scope"]) == ("pagoda.dev", "Namespaced")
    assert spec["names"]["kind"] == "LLMDeployment"
    assert spec["names"]["plural"] == "llmdeployments"
    assert spec["names"]["shortNames"] == ["llmd"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Model",
        "Ready",
        "Warm",
        "Endpoint",
        "Age",
    ]


def schema_at(path: str) -> dict[str, Any]:
    node = crd_schema()
    for part in path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_printer_columns_and_scale_paths_point_at_declared_fields() -> None:
    version = load_crd()["spec"]["versions"][0]
    paths = [c["jsonPath"] for c in version["additionalPrinterColumns"] if c["name"] != "Age"]
    paths += [p for p in version["subresources"]["scale"].values()]
    for path in paths:
        assert "type" in schema_at(path), path


def structural_violations(schema: dict[str, Any], where: str = "") -> Iterator[str]:
    """Kubernetes' structural-schema rule: every node has a type unless it is int-or-string or opaque."""
    opaque = schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in schema and not opaque:
        yield where or "<root>"
    for key, prop in (schema.get("properties") or {}).items():
        yield from structural_violations(prop, f"{where}.{key}")
    for child in ("items", "additionalProperties"):
        if isinstance(schema.get(child), dict):
            yield from structural_violations(schema[child], f"{where}[{child}]")


def test_schema_is_structural() -> None:
    assert list(structural_violations(crd_schema())) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_llmdeployments(path: Any) -> None:
    doc = load_example(path)
    assert doc["apiVersion"] == "pagoda.dev/v1alpha1" and doc["kind"] == "LLMDeployment"
    assert schema_errors(doc) == []
    assert cel_failures(doc) == []
    parse_spec(doc["spec"])  # and the operator accepts them


def test_examples_cover_cpu_gpu_and_autoscaling() -> None:
    specs = {p.name: load_example(p)["spec"] for p in EXAMPLES}
    assert specs["llmdeployment.yaml"]["model"]["source"] == "builtin://smollm2-135m-instruct"
    assert specs["llmdeployment-gpu.yaml"]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert specs["llmdeployment-autoscaling.yaml"]["autoscaling"]["enabled"] is True
    assert specs["llmdeployment-scale-to-zero.yaml"]["autoscaling"]["minReplicas"] == 0
    assert specs["llmdeployment-scale-to-zero.yaml"]["router"]["mode"] == "gateway"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"model": BUILTIN, "replicas": "two"}, "replicas: 'two' is not of type 'integer'"),
        ({"model": BUILTIN, "replicas": -1}, "replicas: -1 is less than the minimum of 0"),
        ({"model": BUILTIN, "engine": {"gpuMemoryUtilization": 1.5}}, "1.5 is greater than the maximum of 1"),
        ({"model": BUILTIN, "engine": {"gpuMemoryUtilization": 0}}, "less than or equal to the minimum of 0"),
        ({"model": BUILTIN, "engine": {"tensorParallelSize": 0}}, "0 is less than the minimum of 1"),
        ({"model": BUILTIN, "engine": {"kvCacheMemory": "lots"}}, "does not match"),
        ({"model": BUILTIN, "autoscaling": {"mode": "keda"}}, "'keda' is not one of ['hpa', 'builtin']"),
        ({"model": BUILTIN, "autoscaling": {"targetKVCacheUsage": 2}}, "2 is greater than the maximum of 1"),
        ({"model": BUILTIN, "warmPool": {"size": 1.5}}, "1.5 is not of type 'integer'"),
        ({"model": BUILTIN, "apiKeySecretRef": {"key": "k"}}, "'name' is a required property"),
        ({"model": {}}, "'source' is a required property"),
        ({}, "'model' is a required property"),
        ({"model": BUILTIN, "warmpool": {"size": 1}}, ".spec.warmpool: not declared in the CRD"),
    ],
)
def test_schema_rejects_wrong_types_and_out_of_range_values(spec: dict[str, Any], fragment: str) -> None:
    errors = schema_errors(custom_resource(spec))
    assert any(fragment in e for e in errors), errors


@pytest.mark.parametrize(
    "source",
    [
        "builtin://smollm2-135m-instruct",
        "hf://Qwen/Qwen2.5-0.5B-Instruct",
        "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
        "pvc://models/llama/8b",
        "s3://my-bucket/models/qwen",
        "https://example.com/models/tiny.Q4_K_M.gguf",
    ],
)
def test_cel_accepts_every_supported_model_source(source: str) -> None:
    assert cel_failures(custom_resource({"model": {"source": source}})) == []


@pytest.mark.parametrize(
    ("spec", "message_start"),
    [
        ({"model": {"source": "ftp://host/model"}}, "model.source must start with"),
        ({"model": {"source": "hf://just-a-name"}}, "an hf:// source names"),
        ({"model": {"source": "hf://org/name/extra"}}, "an hf:// source names"),
        ({"model": {"source": "pvc://Bad_Claim/x"}}, "a pvc:// source names"),
        ({"model": {"source": "pvc://claim"}}, "a pvc:// source names"),
        ({"model": {"source": "s3://bucket"}}, "an s3:// source names"),
        ({"model": {"source": "https://example.com/model.safetensors"}}, "an https:// source must point"),
        ({"model": {"source": "builtin://llama-70b"}}, "the only builtin model"),
        ({"model": {"source": "pvc://models/x", "revision": "v1"}}, "model.revision applies"),
        (
            {"model": BUILTIN, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
            "autoscaling.minReplicas must be",
        ),
        (
            {"model": BUILTIN, "autoscaling": {"minReplicas": 5}},
            "autoscaling.minReplicas must be",
        ),  # default max 4
        ({"model": BUILTIN, "engine": {"extraArgs": ["--port=9000"]}}, "engine.extraArgs must not"),
        ({"model": BUILTIN, "engine": {"extraArgs": ["--api-key", "secret"]}}, "engine.extraArgs must not"),
        ({"model": BUILTIN, "rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "rollout.maxSurge and"),
        (
            {"model": BUILTIN, "autoscaling": {"minReplicas": 0}, "router": {"enabled": False}},
            "autoscaling.minReplicas 0 needs router.enabled",
        ),
        (
            {"model": BUILTIN, "autoscaling": {"minReplicas": 0}, "router": {"holdTimeoutSeconds": 0}},
            "autoscaling.minReplicas 0 needs router.holdTimeoutSeconds",
        ),
    ],
)
def test_cel_rules_reject_specs_the_operator_cannot_serve(spec: dict[str, Any], message_start: str) -> None:
    failures = cel_failures(custom_resource(spec))
    assert any(f.startswith(message_start) for f in failures), failures
    assert schema_errors(custom_resource(spec)) == []  # only CEL catches these


@pytest.mark.parametrize("name", ["1model", "my.model", "Model", "x" * 56])
def test_cel_requires_a_dns_1035_name_for_the_service(name: str) -> None:
    failures = cel_failures(custom_resource({"model": BUILTIN}, name=name))
    assert any(f.startswith("metadata.name must be a DNS-1035 label") for f in failures)


def test_operator_defaults_match_the_crd_defaults() -> None:
    """spec.py mirrors the CRD's defaults for objects that reach it without them."""
    defaulted = apply_defaults(crd_schema(), custom_resource({"model": BUILTIN}))["spec"]
    assert parse_spec(defaulted) == parse_spec({"model": BUILTIN})
    # and the defaulted spec really holds a value for each defaulted knob
    assert defaulted["engine"]["gpuMemoryUtilization"] == 0.9
    assert defaulted["autoscaling"] == {
        "enabled": False,
        "mode": "builtin",
        "minReplicas": 1,
        "maxReplicas": 4,
        "targetWaitingRequests": 4,
        "targetKVCacheUsage": 0.8,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 300,
    }


@pytest.mark.parametrize(
    "spec",
    [
        {"model": BUILTIN, "autoscaling": {"enabled": True, "minReplicas": 0}},
        {"model": BUILTIN, "autoscaling": {"minReplicas": 0}, "router": {"enabled": True}},
        {"model": BUILTIN, "router": {"enabled": False}},
    ],
)
def test_cel_allows_scale_to_zero_with_the_router(spec: dict[str, Any]) -> None:
    assert cel_failures(custom_resource(spec)) == []
    assert schema_errors(custom_resource(spec)) == []
    parse_spec(spec)  # and the operator agrees


def test_router_defaults_match_the_operator() -> None:
    defaulted = apply_defaults(crd_schema(), custom_resource({"model": BUILTIN}))["spec"]
    assert defaulted["router"] == {
        "enabled": True,
        "replicas": 2,
        "policy": "prefix",
        "holdTimeoutSeconds": 60,
        "mode": "service",
    }


@pytest.mark.parametrize(
    ("router", "fragment"),
    [
        ({"policy": "random"}, "router.policy"),
        ({"mode": "mesh"}, "router.mode"),
        ({"replicas": 0}, "router.replicas"),
        ({"resources": {"limits": {"cpu": "lots"}}}, "router.resources.limits.cpu"),
    ],
)
def test_schema_rejects_bad_router_settings(router: dict[str, Any], fragment: str) -> None:
    errors = schema_errors(custom_resource({"model": BUILTIN, "router": router}))
    assert any(e.startswith(f"spec.{fragment}") for e in errors), errors


PLACEMENT = {
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "demo"}},
        }
    ],
    "runtimeClassName": "nvidia",
    "serviceAccountName": "s3-reader",
}


def test_schema_accepts_the_placement_fields() -> None:
    doc = custom_resource({"model": BUILTIN, **PLACEMENT})
    assert schema_errors(doc) == []  # declared (not pruned) and well typed
    assert cel_failures(doc) == []
    parse_spec(doc["spec"])


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("topologySpreadConstraints", {"maxSkew": 1}, "is not of type 'array'"),
        ("topologySpreadConstraints", ["zone"], "'zone' is not of type 'object'"),
        ("runtimeClassName", 1, "1 is not of type 'string'"),
        ("serviceAccountName", ["s3-reader"], "is not of type 'string'"),
    ],
)
def test_schema_rejects_wrongly_typed_placement_fields(field: str, value: Any, fragment: str) -> None:
    errors = schema_errors(custom_resource({"model": BUILTIN, **PLACEMENT, field: value}))
    assert any(e.startswith(f"spec.{field}") and fragment in e for e in errors), errors


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_with_a_cache_name_a_storage_class(path: Any) -> None:
    """Pods land on several nodes: the cluster's default class (single-node ReadWriteOnce on managed
    clusters) would leave a copied example's claim Pending, so each example names a class explicitly."""
    cache = load_example(path)["spec"].get("cache") or {}
    if cache.get("enabled"):
        assert cache.get("storageClassName"), f"{path.name}: cache without storageClassName"
