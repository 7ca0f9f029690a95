"""The manifest builders: every rendered object is checked against the real Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail), then for the contract in ARCHITECTURE.md §4."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from llmd_testkit import EXAMPLES_DIR

from pagoda_operator import builders, labels, router_builders
from pagoda_operator.fetch import local_model_path
from pagoda_operator.spec import parse_spec

K8S_VERSION = "1.32.0"
NS = "ml"
EXAMPLE_SPECS = {p.name: yaml.safe_load(p.read_text())["spec"] for p in sorted(EXAMPLES_DIR.glob("*.yaml"))}


def all_manifests(name: str, raw_spec: dict[str, Any]) -> list[dict[str, Any]]:
    spec = parse_spec(raw_spec)
    return [
        builders.build_deployment(name, NS, spec),
        builders.build_service(name, NS),
        builders.build_pdb(name, NS),
        builders.build_hpa(name, NS, spec),
        builders.build_cache_pvc(name, NS, spec),
        # The InferencePool is no built-in kind: test_router_builders checks it against the v1 API's shape.
        *(
            m
            for m in router_builders.build_router_children(name, NS, spec, "image", 10001)
            if m["kind"] != "InferencePool"
        ),
    ]


def engine(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("example", sorted(EXAMPLE_SPECS))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(example: str) -> None:
    for manifest in all_manifests("demo", EXAMPLE_SPECS[example]):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_the_validator_catches_a_broken_manifest() -> None:
    """Guard: the schema check above can fail (an unknown field and a wrong type)."""
    deployment = builders.build_deployment("demo", NS, parse_spec(EXAMPLE_SPECS["llmdeployment.yaml"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"] = "many"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    service = builders.build_service("demo", NS)
    service["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


def test_engine_runs_pagoda_serve_with_flags_from_the_spec() -> None:
    spec = parse_spec(
        {
            "model": {
                "source": "hf://Qwen/Qwen2.5-7B-Instruct",
                "revision": "v1.0",
                "servedModelName": "qwen",
            },
            "engine": {
                "tensorParallelSize": 2,
                "maxModelLen": 8192,
                "quantization": "awq",
                "gpuMemoryUtilization": 0.85,
                "kvCacheMemory": "4Gi",
                "maxNumSeqs": 64,
                "shutdownTimeoutSeconds": 90,
                "extraArgs": ["--max-num-batched-tokens", "4096"],
            },
            "resources": {"limits": {"nvidia.com/gpu": 2}},
        }
    )
    container = engine(builders.build_deployment("qwen", NS, spec))
    args = container["args"]
    assert container["command"] == ["pagoda", "serve"]
    assert args[0] == local_model_path("hf://Qwen/Qwen2.5-7B-Instruct", "v1.0", "/models")
    assert args[0].startswith("/models/")
    assert (flag(args, "--host"), flag(args, "--port")) == ("0.0.0.0", "8000")
    assert flag(args, "--served-model-name") == "qwen"
    assert flag(args, "--tensor-parallel-size") == "2"
    assert flag(args, "--max-model-len") == "8192"
    assert flag(args, "--quantization") == "awq"
    assert flag(args, "--gpu-memory-utilization") == "0.85"
    assert flag(args, "--kv-cache-memory") == str(4 * 1024**3)
    assert flag(args, "--max-num-seqs") == "64"
    assert flag(args, "--shutdown-timeout") == "90"
    assert args[-2:] == ["--max-num-batched-tokens", "4096"]


def test_builtin_model_runs_pagoda_serve_without_a_model_argument_or_download() -> None:
    deployment = builders.build_deployment(
        "smol", NS, parse_spec({"model": {"source": "builtin://smollm2-135m-instruct"}})
    )
    args = engine(deployment)["args"]
    assert args[0] == "--host"
    assert flag(args, "--served-model-name") == "smol"  # defaults to the LLMDeployment's name
    assert "initContainers" not in deployment["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("source", "revision"),
    [
        ("hf://Qwen/Qwen2.5-0.5B-Instruct", "main"),
        ("https://example.com/m/tiny.Q4_0.gguf", None),
        ("s3://bucket/models/qwen", None),
    ],
)
def test_downloaded_sources_get_a_fetch_init_container(source: str, revision: str | None) -> None:
    model = {"source": source, **({"revision": revision} if revision else {})}
    deployment = builders.build_deployment(
        "m",
        NS,
        parse_spec(
            {"model": model, "engine": {"image": "registry/pagoda:1", "env": [{"name": "X", "value": "1"}]}}
        ),
    )
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert init["image"] == "registry/pagoda:1" == engine(deployment)["image"]
    assert init["command"][:3] == ["pagoda-fetch", "--source", source]
    assert flag(init["command"], "--cache-root") == "/models"
    assert ("--revision" in init["command"]) == (revision is not None)
    assert {"name": "X", "value": "1"} in init["env"]
    assert {"name": "model-cache", "mountPath": "/models"} in init["volumeMounts"]
    assert engine(deployment)["args"][0] == local_model_path(source, revision, "/models")


def test_pvc_source_mounts_the_claim_read_only_where_the_fetcher_layout_expects_it() -> None:
    deployment = builders.build_deployment(
        "m", NS, parse_spec({"model": {"source": "pvc://weights/llama/8b"}})
    )
    pod = deployment["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {
        "name": "model-source",
        "persistentVolumeClaim": {"claimName": "weights", "readOnly": True},
    } in pod["volumes"]
    mount = next(m for m in engine(deployment)["volumeMounts"] if m["name"] == "model-source")
    assert engine(deployment)["args"][0] == local_model_path("pvc://weights/llama/8b", None, "/models")
    assert engine(deployment)["args"][0].startswith(mount["mountPath"] + "/")
    assert mount["readOnly"] is True


def test_pods_are_pre_warmed_and_drain_gracefully() -> None:
    spec = parse_spec(
        {"model": {"source": "builtin://smollm2-135m-instruct"}, "engine": {"shutdownTimeoutSeconds": 45}}
    )
    deployment = builders.build_deployment("m", NS, spec)
    pod = deployment["spec"]["template"]["spec"]
    container = engine(deployment)
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    # Loading the downloaded weights, with a bound: a hung start gives its GPUs back in 30 minutes.
    assert 1800 <= startup["periodSeconds"] * startup["failureThreshold"] < 1800 + startup["periodSeconds"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 45
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_pods_run_non_root_on_a_read_only_root_filesystem() -> None:
    spec = parse_spec(
        {
            "model": {"source": "hf://org/model"},
            "engine": {"tensorParallelSize": 2},
            "resources": {"limits": {"nvidia.com/gpu": 2}},
        }
    )
    deployment = builders.build_deployment("m", NS, spec)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/models", "/tmp"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in engine(deployment)["volumeMounts"]


def test_no_shared_memory_volume_without_tensor_parallelism() -> None:
    deployment = builders.build_deployment("m", NS, parse_spec({"model": {"source": "hf://org/model"}}))
    assert all(v["name"] != "dshm" for v in deployment["spec"]["template"]["spec"]["volumes"])


def test_pods_are_born_in_the_service_and_the_selector_ignores_the_serving_label() -> None:
    spec = parse_spec(
        {"model": {"source": "builtin://smollm2-135m-instruct"}, "replicas": 3, "warmPool": {"size": 2}}
    )
    deployment = builders.build_deployment("m", NS, spec)
    assert deployment["spec"]["replicas"] == 5
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert labels.SERVING not in selector
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    # Fails open: a pod the replica set creates while the operator is down serves once ready.
    assert template_labels.items() >= builders.build_service("m", NS)["spec"]["selector"].items()
    assert template_labels.items() >= selector.items()
    assert template_labels[labels.MANAGED_BY] == "pagoda-operator"
    assert template_labels[labels.NAME] == "pagoda" and template_labels[labels.INSTANCE] == "m"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"


def test_service_selects_only_serving_pods_on_port_8000() -> None:
    service = builders.build_service("qwen", NS)
    assert service["metadata"]["name"] == "qwen"
    assert service["spec"]["selector"] == {
        labels.NAME: "pagoda",
        labels.INSTANCE: "qwen",
        labels.SERVING: "true",
    }
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] == "http"
    assert builders.endpoint_url("qwen", NS) == "http://qwen.ml.svc.cluster.local:8000/v1"


def test_hpa_scales_the_llmdeployment_on_the_adapter_metrics() -> None:
    spec = parse_spec(
        {
            "model": {"source": "builtin://smollm2-135m-instruct"},
            "autoscaling": {
                "enabled": True,
                "mode": "hpa",
                "minReplicas": 2,
                "maxReplicas": 9,
                "targetWaitingRequests": 2.5,
                "targetKVCacheUsage": 0.75,
                "scaleDownStabilizationSeconds": 120,
            },
        }
    )
    hpa = builders.build_hpa("m", NS, spec)["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "pagoda.dev/v1alpha1",
        "kind": "LLMDeployment",
        "name": "m",
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 9)
    pods = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert {m["metric"]["name"]: m["target"] for m in pods} == {
        "vllm_num_requests_waiting": {"type": "AverageValue", "averageValue": "2500m"},
        "vllm_kv_cache_usage_perc": {"type": "AverageValue", "averageValue": "750m"},
    }
    assert all(m["type"] == "Pods" for m in hpa["metrics"])  # minReplicas 2: no external metric needed
    # Scaling from zero: the routers' held requests, the only load there is with no serving pod.
    to_zero = replace(spec, autoscaling=replace(spec.autoscaling, min_replicas=0))
    zero_hpa = builders.build_hpa("m", NS, to_zero)
    kubernetes_validate.validate(zero_hpa, K8S_VERSION, strict=True)
    (external,) = [m["external"] for m in zero_hpa["spec"]["metrics"] if m["type"] == "External"]
    assert external == {
        "metric": {
            "name": "pagoda_router_pending_requests",
            "selector": {"matchLabels": {"llmdeployment": "m"}},
        },
        "target": {"type": "AverageValue", "averageValue": "2500m"},
    }
    assert zero_hpa["spec"]["minReplicas"] == 0
    assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120


@pytest.mark.parametrize(("value", "expected"), [(4.0, "4"), (0.8, "800m"), (2.5, "2500m"), (0.001, "1m")])
def test_quantities_are_exact(value: float, expected: str) -> None:
    assert builders.quantity(value) == expected


def test_pdb_covers_all_engine_pods_one_at_a_time() -> None:
    pdb = builders.build_pdb("m", NS)["spec"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"] == labels.selector_labels("m")


def test_api_key_comes_from_the_secret_never_the_pod_spec() -> None:
    spec = parse_spec(
        {"model": {"source": "builtin://smollm2-135m-instruct"}, "apiKeySecretRef": {"name": "keys"}}
    )
    container = engine(builders.build_deployment("m", NS, spec))
    assert {
        "name": "PAGODA_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}},
    } in container["env"]
    assert "--api-key" not in container["args"]


def test_cache_pvc_and_its_mount() -> None:
    spec = parse_spec(
        {
            "model": {"source": "hf://org/model"},
            "cache": {
                "enabled": True,
                "size": "80Gi",
                "storageClassName": "fast",
                "accessMode": "ReadWriteOnce",
            },
            "rollout": {"maxSurge": 0, "maxUnavailable": 1},  # one pod: a single-node volume works
        }
    )
    pvc = builders.build_cache_pvc("m", NS, spec)
    assert pvc["metadata"]["name"] == "m-model-cache"
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "80Gi"}},
        "storageClassName": "fast",
    }
    volumes = builders.build_deployment("m", NS, spec)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "m-model-cache"}} in volumes


def test_placement_is_passed_through() -> None:
    raw = EXAMPLE_SPECS["llmdeployment-gpu.yaml"]
    pod = builders.build_deployment("m", NS, parse_spec(raw))["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == raw["nodeSelector"]
    assert pod["tolerations"] == raw["tolerations"]
    assert pod["affinity"] == raw["affinity"]
    spec = parse_spec(
        {"model": {"source": "builtin://smollm2-135m-instruct"}, "priorityClassName": "llm-high"}
    )
    assert (
        builders.build_deployment("m", NS, spec)["spec"]["template"]["spec"]["priorityClassName"]
        == "llm-high"
    )


# ------------------------------------------------------------------------ issue 11: real clusters

ROLLOUT_BASE = {"model": {"source": "builtin://smollm2-135m-instruct"}, "replicas": 2}


@pytest.mark.parametrize(
    ("extra", "surge", "unavailable"),
    [
        ({}, 1, 0),  # no warm pool: start a new pod first, capacity never drops
        ({"warmPool": {"size": 1}}, 0, 1),  # full GPU pool: replace a warm pod first, no spare GPU needed
        ({"warmPool": {"size": 1}, "rollout": {"maxSurge": 2}}, 2, 0),
        ({"rollout": {"maxSurge": 0, "maxUnavailable": 2}}, 0, 2),
    ],
)
def test_rollout_strategy_needs_no_spare_gpu_with_a_warm_pool(
    extra: dict[str, Any], surge: int, unavailable: int
) -> None:
    deployment = builders.build_deployment("m", NS, parse_spec({**ROLLOUT_BASE, **extra}))
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": surge, "maxUnavailable": unavailable}
    # Fits model loading (an hour by default), not the 6 hours a hung rollout used to wait.
    assert deployment["spec"]["progressDeadlineSeconds"] == 3600
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_rollout_deadline_and_startup_budget_come_from_the_spec() -> None:
    spec = parse_spec(
        {
            **ROLLOUT_BASE,
            "rollout": {"progressDeadlineSeconds": 900},
            "engine": {"startupTimeoutSeconds": 600},
        }
    )
    deployment = builders.build_deployment("m", NS, spec)
    assert deployment["spec"]["progressDeadlineSeconds"] == 900
    startup = engine(deployment)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600


def test_engine_pods_leave_the_uid_to_the_platform_when_asked() -> None:
    spec = parse_spec(ROLLOUT_BASE)
    pinned = builders.build_deployment("m", NS, spec)["spec"]["template"]["spec"]["securityContext"]
    assert pinned["runAsUser"] == pinned["fsGroup"] == builders.RUN_AS_USER
    deployment = builders.build_deployment("m", NS, spec, run_as_user=None)
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True
    assert not {"runAsUser", "runAsGroup", "fsGroup"} & set(context)
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_safe_defaults_requests_bounded_scratch_and_a_read_only_cache() -> None:
    spec = parse_spec({"model": {"source": "hf://org/model"}, "cache": {"size": "80Gi"}})
    deployment = builders.build_deployment("m", NS, spec)
    pod = deployment["spec"]["template"]["spec"]
    container = engine(deployment)
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "80Gi"}  # no claim: scratch, bounded
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "1Gi"}
    # The fetcher writes the cache, the engine only reads it.
    (fetch,) = pod["initContainers"]
    assert not any(m.get("readOnly") for m in fetch["volumeMounts"] if m["mountPath"] == "/models")
    (cache_mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert cache_mount["readOnly"] is True
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"limits": {"memory": "2Gi"}}, {"requests": {"cpu": "1"}, "limits": {"memory": "2Gi"}}),
        ({"requests": {"cpu": "4"}}, {"requests": {"cpu": "4", "memory": "4Gi"}}),
        (
            {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"nvidia.com/gpu": 1}},
            {"requests": {"cpu": "2", "memory": "16Gi"}, "limits": {"nvidia.com/gpu": 1}},
        ),
    ],
)
def test_default_requests_never_override_what_the_spec_names(
    resources: dict[str, Any], expected: dict[str, Any]
) -> None:
    spec = parse_spec({"model": {"source": "builtin://smollm2-135m-instruct"}, "resources": resources})
    assert engine(builders.build_deployment("m", NS, spec))["resources"] == expected


def test_placement_spreads_replicas_and_takes_runtime_class_and_service_account() -> None:
    base = {"model": {"source": "s3://bucket/model"}, "replicas": 3}
    pod = builders.build_deployment("m", NS, parse_spec(base))["spec"]["template"]["spec"]
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread.values():
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"  # spreading never blocks a pod
        assert constraint["labelSelector"]["matchLabels"] == labels.selector_labels("m")
    custom = [{"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]
    spec = parse_spec(
        {
            **base,
            "topologySpreadConstraints": custom,
            "runtimeClassName": "nvidia",
            "serviceAccountName": "s3-reader",
        }
    )
    deployment = builders.build_deployment("m", NS, spec)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"] == custom
    assert pod["runtimeClassName"] == "nvidia" and pod["serviceAccountName"] == "s3-reader"
    kubernetes_validate.validate(deployment, "1.30.0", strict=True)
    off = parse_spec({**base, "topologySpreadConstraints": []})
    off_pod = builders.build_deployment("m", NS, off)["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in off_pod
