"""Pure manifest builders: an LLMDeployment's parsed spec in, plain Kubernetes manifest dicts out.

No API calls here; the handlers adopt (owner references) and apply what these return.
"""

from __future__ import annotations

from typing import Any

from pagoda_operator import labels
from pagoda_operator.fetch import local_model_path
from pagoda_operator.spec import GROUP, KIND, VERSION, LLMDeploymentSpec

ENGINE_PORT = 8000
CACHE_ROOT = "/models"
# fetch.py's layout: pvc://claim/path is read from <cache root>/pvc/path, where the claim is mounted.
PVC_SOURCE_MOUNT = f"{CACHE_ROOT}/pvc"
DEFAULT_ENGINE_IMAGE = "ghcr.io/pagoda-dev/pagoda-server:0.1.0"
RUN_AS_USER = 10001  # the engine image's `pagoda` user (Dockerfile)

STARTUP_PROBE_PERIOD_SECONDS = 10
# Long enough for every kube-proxy / ingress to drop the pod from its endpoints before SIGTERM.
PRESTOP_SLEEP_SECONDS = 10
GRACE_MARGIN_SECONDS = 15

# Requests for an engine that names none: without them the scheduler packs pods onto a node that cannot
# hold them and the kubelet evicts them under pressure first (BestEffort).
DEFAULT_ENGINE_REQUESTS = {"cpu": "1", "memory": "4Gi"}
# Scratch space that would otherwise grow on the node's disk without bound.
TMP_SIZE_LIMIT = "1Gi"
SHM_SIZE_LIMIT = "8Gi"

# The replica set deletes the lowest cost first: idle warm pods before pods that serve traffic.
SERVING_DELETION_COST = 1000
WARM_DELETION_COST = 0
UNREADY_DELETION_COST = -1000


def metadata(name: str, namespace: str, instance: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels.common_labels(instance)}


def endpoint_url(name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:{ENGINE_PORT}/v1"


def cache_claim_name(name: str) -> str:
    return f"{name}-model-cache"


def termination_grace_seconds(spec: LLMDeploymentSpec) -> int:
    """preStop sleep + the engine's drain must both fit, or the kubelet SIGKILLs in-flight requests."""
    return PRESTOP_SLEEP_SECONDS + spec.engine.shutdown_timeout_seconds + GRACE_MARGIN_SECONDS


def model_path(spec: LLMDeploymentSpec) -> str | None:
    """What `pagoda serve` loads: the fetcher's cache path, or None for the model inside the image."""
    return local_model_path(spec.model.source, spec.model.revision, CACHE_ROOT)


def engine_args(name: str, spec: LLMDeploymentSpec) -> list[str]:
    """`pagoda serve` arguments (vLLM's flag names); extraArgs last, so they refine the rest."""
    engine = spec.engine
    path = model_path(spec)
    args = [path] if path is not None else []
    args += [
        "--host",
        "0.0.0.0",
        "--port",
        str(ENGINE_PORT),
        "--served-model-name",
        spec.model.served_model_name or name,
        "--tensor-parallel-size",
        str(engine.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(engine.gpu_memory_utilization),
        "--shutdown-timeout",
        str(engine.shutdown_timeout_seconds),
    ]
    if engine.max_model_len is not None:
        args += ["--max-model-len", str(engine.max_model_len)]
    if engine.quantization is not None:
        args += ["--quantization", engine.quantization]
    if engine.kv_cache_memory_bytes is not None:
        args += ["--kv-cache-memory", str(engine.kv_cache_memory_bytes)]
    if engine.max_num_seqs is not None:
        args += ["--max-num-seqs", str(engine.max_num_seqs)]
    return args + list(engine.extra_args)


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def volumes_and_mounts(
    name: str, spec: LLMDeploymentSpec
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The root filesystem is read-only: weights go to /models (the cache PVC or scratch), Python to /tmp."""
    # Without a claim the weights land in scratch space: bounded by cache.size like the claim would be,
    # so a 70B model cannot fill the node's disk on every pod start unnoticed.
    cache_volume: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": cache_claim_name(name)}}
        if spec.cache.enabled
        else {"emptyDir": {"sizeLimit": spec.cache.size}}
    )
    volumes = [
        {"name": "model-cache", **cache_volume},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
    ]
    mounts = [{"name": "model-cache", "mountPath": CACHE_ROOT}, {"name": "tmp", "mountPath": "/tmp"}]
    if spec.model.scheme == "pvc":
        claim = spec.model.source.removeprefix("pvc://").split("/", 1)[0]
        volumes.append(
            {"name": "model-source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": "model-source", "mountPath": PVC_SOURCE_MOUNT, "readOnly": True})
    if spec.engine.tensor_parallel_size > 1:
        # NCCL and torch.distributed exchange tensors through shared memory; 64 MiB is too small.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def engine_resources(spec: LLMDeploymentSpec) -> dict[str, Any]:
    """The spec's resources, with default requests for CPU and memory it neither requests nor limits
    (a limit alone already sets the request)."""
    resources = {key: dict(value) for key, value in spec.resources.items()}
    named = set(resources.get("requests") or {}) | set(resources.get("limits") or {})
    defaults = {k: v for k, v in DEFAULT_ENGINE_REQUESTS.items() if k not in named}
    if defaults:
        resources["requests"] = {**defaults, **(resources.get("requests") or {})}
    return resources


def engine_mounts(mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The engine only reads the weights: the cache is writable for the fetcher alone."""
    return [{**m, "readOnly": True} if m["mountPath"] == CACHE_ROOT else m for m in mounts]


def default_topology_spread(name: str) -> list[dict[str, Any]]:
    """Replicas spread over nodes and zones where the cluster allows it (never blocks scheduling), per
    revision (pod-template-hash), so a rollout's new pods spread too."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": labels.selector_labels(name)},
            "matchLabelKeys": ["pod-template-hash"],
        }
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")
    ]


def engine_env(spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}]
    if spec.api_key_secret_ref is not None:
        ref = spec.api_key_secret_ref
        env.append(
            {"name": "PAGODA_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    return env + [dict(item) for item in spec.engine.env]


def fetch_container(spec: LLMDeploymentSpec, image: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    """Downloads the weights once into /models; a restarted pod finds them there and skips the download."""
    command = ["pagoda-fetch", "--source", spec.model.source, "--cache-root", CACHE_ROOT]
    if spec.model.revision is not None:
        command += ["--revision", spec.model.revision]
    return {
        "name": "fetch-model",
        "image": image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": command,
        "env": [{"name": "HOME", "value": "/tmp"}, *(dict(item) for item in spec.engine.env)],
        # Downloads stream to disk in chunks: a bounded memory limit keeps a runaway fetch off the node.
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }


def http_probe(path: str, period: int, timeout: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def engine_container(
    name: str, spec: LLMDeploymentSpec, image: str, mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "name": "engine",
        "image": image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["pagoda", "serve"],
        "args": engine_args(name, spec),
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": engine_env(spec),
        "resources": engine_resources(spec),
        # Ready only once the model is loaded and warmed up; the startup budget is hours.
        # The weights are on disk by now (the init container fetched them): this budget is for loading.
        "startupProbe": http_probe(
            "/ready",
            STARTUP_PROBE_PERIOD_SECONDS,
            5,
            -(-spec.engine.startup_timeout_seconds // STARTUP_PROBE_PERIOD_SECONDS),
        ),
        "readinessProbe": http_probe("/ready", 5, 5, 3),
        "livenessProbe": http_probe("/health", 15, 10, 4),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": container_security_context(),
        "volumeMounts": engine_mounts(mounts),
    }


def pod_security_context(run_as_user: int | None) -> dict[str, Any]:
    """None leaves the UID to the platform (OpenShift assigns one per namespace); the image runs as any."""
    context: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if run_as_user is not None:
        context.update(runAsUser=run_as_user, runAsGroup=run_as_user, fsGroup=run_as_user)
    return context


def rollout_strategy(spec: LLMDeploymentSpec) -> dict[str, Any]:
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": spec.max_surge, "maxUnavailable": spec.max_unavailable},
    }


def build_deployment(
    name: str,
    namespace: str,
    spec: LLMDeploymentSpec,
    default_image: str = DEFAULT_ENGINE_IMAGE,
    run_as_user: int | None = RUN_AS_USER,
) -> dict[str, Any]:
    """Engine pods: the serving replicas plus the warm pool, each joining the Service once ready."""
    image = spec.engine.image or default_image
    volumes, mounts = volumes_and_mounts(name, spec)
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the engine never talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "securityContext": pod_security_context(run_as_user),
        "containers": [engine_container(name, spec, image, mounts)],
        "volumes": volumes,
    }
    if spec.model.needs_download:
        pod_spec["initContainers"] = [fetch_container(spec, image, mounts)]
    if spec.node_selector:
        pod_spec["nodeSelector"] = spec.node_selector
    if spec.tolerations:
        pod_spec["tolerations"] = list(spec.tolerations)
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    spread = spec.topology_spread_constraints
    pod_spec["topologySpreadConstraints"] = (
        default_topology_spread(name) if spread is None else [dict(c) for c in spread]
    )
    if not pod_spec["topologySpreadConstraints"]:  # [] opts out
        del pod_spec["topologySpreadConstraints"]
    if spec.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.runtime_class_name
    if spec.service_account_name:
        # Workload identity for s3:// (IRSA, GKE/Azure workload identity) binds to a service account.
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, namespace, name),
        "spec": {
            "replicas": spec.replicas + spec.warm_pool_size,
            "selector": {"matchLabels": labels.selector_labels(name)},
            "strategy": rollout_strategy(spec),
            "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
            "revisionHistoryLimit": 3,
            "template": {
                "metadata": {
                    # Born serving: a ready pod joins the Service even while the operator is down
                    # (fails open); the operator demotes the surplus into the warm pool.
                    "labels": {**labels.common_labels(name), labels.SERVING: "true"},
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(ENGINE_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def build_service(name: str, namespace: str, router: bool = False) -> dict[str, Any]:
    """The in-cluster OpenAI endpoint: the router pods, or without a router the pods labelled
    serving=true."""
    selector = (
        labels.router_selector_labels(name)
        if router
        else {**labels.selector_labels(name), labels.SERVING: "true"}
    )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, namespace, name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": "http",
                    "port": ENGINE_PORT,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def quantity(value: float) -> str:
    """A float as an exact Kubernetes quantity: 4.0 -> "4", 0.8 -> "800m"."""
    milli = round(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def pods_metric(metric: str, average: float) -> dict[str, Any]:
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": metric},
            "target": {"type": "AverageValue", "averageValue": quantity(average)},
        },
    }


def router_pending_metric(name: str, average: float) -> dict[str, Any]:
    """The routers' held requests (prometheus-adapter's external rule, summed over the router pods): at
    zero serving pods there is no per-pod metric to average, and this one still counts the queue. An HPA
    with minReplicas 0 needs the cluster's HPAScaleToZero feature gate."""
    return {
        "type": "External",
        "external": {
            "metric": {
                "name": "pagoda_router_pending_requests",
                "selector": {"matchLabels": {"llmdeployment": name}},
            },
            "target": {"type": "AverageValue", "averageValue": quantity(average)},
        },
    }


def build_hpa(name: str, namespace: str, spec: LLMDeploymentSpec) -> dict[str, Any]:
    """An HPA on the LLMDeployment's scale subresource, fed by prometheus-adapter's per-pod metrics."""
    autoscaling = spec.autoscaling
    # Only where it is needed: an HPA does not scale down while one of its metrics is unavailable, and
    # the external metric needs the adapter's externalRules and the external metrics API registered.
    scales_from_zero = spec.router.enabled and autoscaling.min_replicas == 0
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(name, namespace, name),
        "spec": {
            "scaleTargetRef": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name},
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [
                pods_metric("vllm_num_requests_waiting", autoscaling.target_waiting_requests),
                pods_metric("vllm_kv_cache_usage_perc", autoscaling.target_kv_cache_usage),
                *(
                    [router_pending_metric(name, autoscaling.target_waiting_requests)]
                    if scales_from_zero
                    else []
                ),
            ],
            "behavior": {
                # Queues grow fast: scale up at once (warm pods make it cheap); scale down slowly.
                "scaleUp": {
                    "stabilizationWindowSeconds": autoscaling.scale_up_stabilization_seconds,
                    "selectPolicy": "Max",
                    "policies": [
                        {"type": "Percent", "value": 100, "periodSeconds": 15},
                        {"type": "Pods", "value": 4, "periodSeconds": 15},
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": autoscaling.scale_down_stabilization_seconds,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
            },
        },
    }


def build_pdb(name: str, namespace: str) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take one engine pod at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(name, namespace, name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": labels.selector_labels(name)},
            # A pod still loading its model must not block a node drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_cache_pvc(name: str, namespace: str, spec: LLMDeploymentSpec) -> dict[str, Any]:
    pvc_spec: dict[str, Any] = {
        "accessModes": [spec.cache.access_mode],
        "resources": {"requests": {"storage": spec.cache.size}},
    }
    if spec.cache.storage_class_name:
        pvc_spec["storageClassName"] = spec.cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(cache_claim_name(name), namespace, name),
        "spec": pvc_spec,
    }
