"""The LLMDeployment spec as typed, validated dataclasses.

The API server applies the CRD's defaults and schema before the operator sees an object; `parse_spec`
applies the same defaults (tests keep them equal to the CRD's) so that an object written without them
(an older CRD, a test emulator) reconciles the same way, and raises `InvalidSpecError` with a message
for the user for what the schema cannot express.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pagoda_operator.fetch import FetchError, local_model_path

GROUP = "pagoda.dev"
VERSION = "v1alpha1"
PLURAL = "llmdeployments"
KIND = "LLMDeployment"

BUILTIN_MODEL = "builtin://smollm2-135m-instruct"
MODEL_SCHEMES = ("hf://", "pvc://", "s3://", "https://", "builtin://")
# Flags the operator owns: the probes, the Service and the Secret-backed API key depend on them.
RESERVED_ENGINE_FLAGS = ("--host", "--port", "--api-key")
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")
# An HPA's averageValue is a quantity in thousandths: a smaller target would round to an invalid 0.
HPA_TARGET_STEP = 0.001
MAX_TARGET_WAITING = 1e6

# number, then a suffix (Ki..Ei, n..E) or a decimal exponent: "1E" is 10**18, "1E3" is 1000
_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([KMGTPE]i|[numkMGTPE])|[eE]([+-]?\d+))?$")
_QUANTITY_FACTORS: dict[str, Decimal | int] = {
    "": 1,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


class InvalidSpecError(ValueError):
    """A spec that cannot work as written; the message tells the user what to change."""


def parse_quantity(value: int | str) -> Decimal:
    """A Kubernetes resource quantity ("4Gi", "500m", "1e3", 42) as an exact number."""
    if isinstance(value, bool):
        raise InvalidSpecError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        return Decimal(value)
    match = _QUANTITY.match(str(value).strip())
    if match is None:
        raise InvalidSpecError(f"{value!r} is not a Kubernetes quantity (e.g. 4Gi, 500M, 1073741824)")
    number, suffix, exponent = match.groups()
    try:
        if exponent is not None:
            return Decimal(number).scaleb(int(exponent))
        return Decimal(number) * _QUANTITY_FACTORS[suffix or ""]
    except (ArithmeticError, ValueError) as err:  # decimal.Overflow (1e999999999), an exponent of 5000 digits
        raise InvalidSpecError(f"{value!r} is too large a quantity") from err


@dataclass(frozen=True)
class ModelSpec:
    source: str
    revision: str | None = None
    served_model_name: str | None = None

    @property
    def scheme(self) -> str:
        return self.source.split("://", 1)[0]

    @property
    def needs_download(self) -> bool:
        return self.scheme in ("hf", "https", "s3")


@dataclass(frozen=True)
class EngineSpec:
    image: str | None = None
    image_pull_policy: str = "IfNotPresent"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    quantization: str | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int | None = None
    shutdown_timeout_seconds: int = 60
    # The startup probe's budget for loading and warming the model (the download runs before, in an init
    # container): a hung start gives its GPUs back after this, not after hours.
    startup_timeout_seconds: int = 1800
    extra_args: tuple[str, ...] = ()
    env: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class AutoscalingSpec:
    enabled: bool = False
    mode: str = "builtin"
    min_replicas: int = 1
    max_replicas: int = 4
    target_waiting_requests: float = 4.0
    target_kv_cache_usage: float = 0.8
    scale_up_stabilization_seconds: int = 0
    scale_down_stabilization_seconds: int = 300


@dataclass(frozen=True)
class CacheSpec:
    enabled: bool = False
    storage_class_name: str | None = None
    size: str = "50Gi"
    access_mode: str = "ReadWriteMany"


@dataclass(frozen=True)
class RolloutSpec:
    """How the Deployment replaces pods; None means the operator picks (see `LLMDeploymentSpec`)."""

    max_surge: int | None = None
    max_unavailable: int | None = None
    # Beyond this the Deployment reports ProgressDeadlineExceeded, copied into the status as Degraded.
    progress_deadline_seconds: int = 3600


@dataclass(frozen=True)
class RouterSpec:
    """`pagoda router` in front of the serving pods (ARCHITECTURE.md §3b)."""

    enabled: bool = True
    replicas: int = 2
    policy: str = "prefix"
    hold_timeout_seconds: int = 60
    resources: dict[str, Any] = field(default_factory=dict)
    image: str | None = None  # None: the engine's image (the router runs from the server image)
    mode: str = "service"  # gateway: also an InferencePool whose endpoint picker is the router

    @property
    def gateway(self) -> bool:
        return self.enabled and self.mode == "gateway"


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str = "api-key"


@dataclass(frozen=True)
class LLMDeploymentSpec:
    model: ModelSpec
    engine: EngineSpec = field(default_factory=EngineSpec)
    resources: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    autoscaling: AutoscalingSpec = field(default_factory=AutoscalingSpec)
    warm_pool_size: int = 0
    cache: CacheSpec = field(default_factory=CacheSpec)
    api_key_secret_ref: SecretKeyRef | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    topology_spread_constraints: tuple[dict[str, Any], ...] | None = None  # None: the operator's default
    runtime_class_name: str | None = None
    service_account_name: str | None = None
    router: RouterSpec = field(default_factory=RouterSpec)

    @property
    def gpu_count(self) -> int:
        limits = self.resources.get("limits") or {}
        return sum(int(parse_quantity(limits[name])) for name in GPU_RESOURCES if name in limits)

    @property
    def hpa_enabled(self) -> bool:
        return self.autoscaling.enabled and self.autoscaling.mode == "hpa"

    @property
    def builtin_autoscaling_enabled(self) -> bool:
        return self.autoscaling.enabled and self.autoscaling.mode == "builtin"

    @property
    def max_surge(self) -> int:
        """A surge pod needs a spare GPU, which a full pool does not have: with a warm pool, replace a
        warm pod first (the replica set deletes warm pods before serving ones) and keep serving capacity."""
        if self.rollout.max_surge is not None:
            return self.rollout.max_surge
        return 0 if self.warm_pool_size > 0 else 1

    @property
    def max_unavailable(self) -> int:
        if self.rollout.max_unavailable is not None:
            return self.rollout.max_unavailable
        return 1 if self.max_surge == 0 else 0

    @property
    def max_pods(self) -> int:
        """The most engine pods that can exist at once: the scaling ceiling, the warm pool, a surge."""
        serving = self.autoscaling.max_replicas if self.autoscaling.enabled else self.replicas
        return serving + self.warm_pool_size + self.max_surge


def _int(section: Mapping[str, Any], key: str, default: int | None, low: int, high: int, where: str) -> Any:
    value = section.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidSpecError(f"{where}.{key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _number(
    section: Mapping[str, Any], key: str, default: float, high: float, where: str, low: float | None = None
) -> float:
    """A number in (0, high], or in [low, high] when `low` is given."""
    value = section.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value <= 0
        or (low is not None and value < low)
        or value > high
    ):
        bound = f"[{low:g}, {high:g}]" if low is not None else f"(0, {high:g}]"
        raise InvalidSpecError(f"{where}.{key} must be a number in {bound}, got {value!r}")
    return float(value)


def _choice(
    section: Mapping[str, Any], key: str, default: str | None, choices: tuple[str, ...], where: str
) -> Any:
    value = section.get(key, default)
    if value is not None and value not in choices:
        raise InvalidSpecError(f"{where}.{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _section(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise InvalidSpecError(f"spec.{key} must be an object")
    return value


def parse_resources(resources: Any, where: str) -> dict[str, Any]:
    """ResourceRequirements held to what the API server checks on the pod template (its schema alone lets
    these through): quantities, none negative, requests within limits, whole GPUs requested as limited."""
    if not isinstance(resources, Mapping):
        raise InvalidSpecError(f"{where} must be an object")
    amounts: dict[str, dict[str, Decimal]] = {}
    for kind in ("limits", "requests"):
        values = resources.get(kind) or {}
        if not isinstance(values, Mapping):
            raise InvalidSpecError(f"{where}.{kind} must be an object of quantities")
        try:
            amounts[kind] = {name: parse_quantity(value) for name, value in values.items()}
        except InvalidSpecError as err:
            raise InvalidSpecError(f"{where}.{kind}: {err}") from None
        for name, amount in amounts[kind].items():
            if amount < 0:
                raise InvalidSpecError(f"{where}.{kind}.{name} must not be negative, got {values[name]!r}")
            if name in GPU_RESOURCES and amount != amount.to_integral_value():
                raise InvalidSpecError(f"{where}.{kind}.{name} must be a whole number, got {values[name]!r}")
    limits, requests = amounts["limits"], amounts["requests"]
    for name, request in requests.items():
        if name in GPU_RESOURCES and limits.get(name) != request:
            raise InvalidSpecError(f"{where}: GPUs are never overcommitted: limits.{name} must equal it")
        if name in limits and request > limits[name]:
            raise InvalidSpecError(f"{where}.requests.{name} must not exceed limits.{name}")
    return {kind: dict(values) for kind, values in resources.items()}


def parse_model(model: Mapping[str, Any]) -> ModelSpec:
    source = model.get("source")
    if not isinstance(source, str) or not source.startswith(MODEL_SCHEMES):
        raise InvalidSpecError(
            f"spec.model.source must start with one of {', '.join(MODEL_SCHEMES)}, got {source!r}"
        )
    if source.startswith("builtin://") and source != BUILTIN_MODEL:
        raise InvalidSpecError(f"the only builtin model is {BUILTIN_MODEL}, got {source!r}")
    if source.startswith("https://") and not source.endswith(".gguf"):
        raise InvalidSpecError(f"an https:// model source must point at a .gguf file, got {source!r}")
    revision = model.get("revision")
    if revision is not None and not source.startswith("hf://"):
        raise InvalidSpecError("spec.model.revision applies to hf:// sources only")
    try:
        local_model_path(source, revision)
    except FetchError as err:
        raise InvalidSpecError(f"spec.model.source: {err}") from None
    return ModelSpec(source=source, revision=revision, served_model_name=model.get("servedModelName"))


def parse_engine(engine: Mapping[str, Any]) -> EngineSpec:
    where = "spec.engine"
    extra_args = tuple(str(arg) for arg in engine.get("extraArgs") or ())
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        # argparse takes any unambiguous prefix of a flag: --po 9000 is --port 9000
        reserved = [r for r in RESERVED_ENGINE_FLAGS if len(flag) > 2 and r.startswith(flag)]
        if reserved:
            raise InvalidSpecError(
                f"{where}.extraArgs must not set {reserved[0]} ({flag}): the operator owns --host and --port "
                "(probes and the Service use them); put the API key in apiKeySecretRef"
            )
    kv_cache_memory = engine.get("kvCacheMemory")
    kv_cache_bytes = None if kv_cache_memory is None else int(parse_quantity(kv_cache_memory))
    if kv_cache_bytes is not None and not 0 < kv_cache_bytes <= 2**60:  # 1Ei: no int too long to print
        raise InvalidSpecError(f"{where}.kvCacheMemory must be in (0, 1Ei], got {kv_cache_memory!r}")
    return EngineSpec(
        image=engine.get("image"),
        image_pull_policy=_choice(
            engine, "imagePullPolicy", "IfNotPresent", ("Always", "IfNotPresent", "Never"), where
        ),
        tensor_parallel_size=_int(engine, "tensorParallelSize", 1, 1, 64, where),
        max_model_len=_int(engine, "maxModelLen", None, 16, 16777216, where),
        quantization=_choice(
            engine, "quantization", None, ("awq", "gptq", "fp8", "gguf", "bitsandbytes"), where
        ),
        gpu_memory_utilization=_number(engine, "gpuMemoryUtilization", 0.9, 1.0, where),
        kv_cache_memory_bytes=kv_cache_bytes,
        max_num_seqs=_int(engine, "maxNumSeqs", None, 1, 65536, where),
        shutdown_timeout_seconds=_int(engine, "shutdownTimeoutSeconds", 60, 0, 3600, where),
        startup_timeout_seconds=_int(engine, "startupTimeoutSeconds", 1800, 60, 6 * 3600, where),
        extra_args=extra_args,
        env=tuple(dict(item) for item in engine.get("env") or ()),
    )


def parse_autoscaling(autoscaling: Mapping[str, Any]) -> AutoscalingSpec:
    where = "spec.autoscaling"
    parsed = AutoscalingSpec(
        enabled=bool(autoscaling.get("enabled", False)),
        mode=_choice(autoscaling, "mode", "builtin", ("hpa", "builtin"), where),
        min_replicas=_int(autoscaling, "minReplicas", 1, 0, 1000, where),
        max_replicas=_int(autoscaling, "maxReplicas", 4, 1, 1000, where),
        target_waiting_requests=_number(
            autoscaling, "targetWaitingRequests", 4.0, MAX_TARGET_WAITING, where, low=HPA_TARGET_STEP
        ),
        target_kv_cache_usage=_number(
            autoscaling, "targetKVCacheUsage", 0.8, 1.0, where, low=HPA_TARGET_STEP
        ),
        scale_up_stabilization_seconds=_int(autoscaling, "scaleUpStabilizationSeconds", 0, 0, 3600, where),
        scale_down_stabilization_seconds=_int(
            autoscaling, "scaleDownStabilizationSeconds", 300, 0, 3600, where
        ),
    )
    if parsed.min_replicas > parsed.max_replicas:
        raise InvalidSpecError(
            f"{where}.minReplicas ({parsed.min_replicas}) must be less than or equal to "
            f"maxReplicas ({parsed.max_replicas})"
        )
    return parsed


def parse_cache(cache: Mapping[str, Any]) -> CacheSpec:
    size = cache.get("size", "50Gi")
    if parse_quantity(size) < 1:  # a claim's request and a scratch volume's limit: bytes, at least one
        raise InvalidSpecError(f"spec.cache.size must be a positive number of bytes, got {size!r}")
    return CacheSpec(
        enabled=bool(cache.get("enabled", False)),
        storage_class_name=cache.get("storageClassName"),
        size=str(size),
        access_mode=_choice(
            cache,
            "accessMode",
            "ReadWriteMany",
            ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"),
            "spec.cache",
        ),
    )


def parse_rollout(rollout: Mapping[str, Any]) -> RolloutSpec:
    where = "spec.rollout"
    parsed = RolloutSpec(
        max_surge=_int(rollout, "maxSurge", None, 0, 100, where),
        max_unavailable=_int(rollout, "maxUnavailable", None, 0, 100, where),
        progress_deadline_seconds=_int(rollout, "progressDeadlineSeconds", 3600, 60, 6 * 3600, where),
    )
    if parsed.max_surge == 0 and parsed.max_unavailable == 0:
        raise InvalidSpecError(f"{where}: maxSurge and maxUnavailable cannot both be 0 (no pod could move)")
    return parsed


def parse_router(router: Mapping[str, Any]) -> RouterSpec:
    where = "spec.router"
    return RouterSpec(
        enabled=bool(router.get("enabled", True)),
        replicas=_int(router, "replicas", 2, 1, 100, where),
        policy=_choice(router, "policy", "prefix", ("prefix", "least-load", "round-robin"), where),
        hold_timeout_seconds=_int(router, "holdTimeoutSeconds", 60, 0, 3600, where),
        resources=parse_resources(router.get("resources") or {}, f"{where}.resources"),
        image=router.get("image"),
        mode=_choice(router, "mode", "service", ("service", "gateway"), where),
    )


def check_scale_to_zero(spec: LLMDeploymentSpec) -> None:
    """Without the router nothing holds a request while the first pod starts: the Service has no
    endpoint and clients get connection errors."""
    if spec.autoscaling.min_replicas == 0 and not spec.router.enabled:
        raise InvalidSpecError(
            "spec.autoscaling.minReplicas 0 needs spec.router.enabled: the router holds requests while "
            "the first pod starts"
        )
    if spec.autoscaling.min_replicas == 0 and spec.router.hold_timeout_seconds == 0:
        raise InvalidSpecError(
            "spec.autoscaling.minReplicas 0 needs spec.router.holdTimeoutSeconds > 0: the requests the "
            "router holds are what scales from zero"
        )


def check_storage(spec: LLMDeploymentSpec) -> None:
    """A single-node access mode cannot serve pods that may land on several nodes at once."""
    mode, pods = spec.cache.access_mode, spec.max_pods
    if not spec.cache.enabled or mode == "ReadWriteMany" or pods <= 1:
        return
    how = (
        f"up to {pods} engine pods can exist at once (replicas or autoscaling.maxReplicas, "
        f"warmPool.size {spec.warm_pool_size}, rollout surge {spec.max_surge})"
    )
    if mode == "ReadWriteOncePod":
        raise InvalidSpecError(
            f"spec.cache.accessMode ReadWriteOncePod lets one pod mount the cache, but {how}: a rollout "
            "would wait forever for the old pod's claim; use ReadWriteMany (a storage class that offers it)"
        )
    raise InvalidSpecError(
        f"spec.cache.accessMode ReadWriteOnce attaches the cache to one node, but {how} and pods on "
        "other nodes fail with multi-attach errors; use ReadWriteMany with a storage class that offers "
        "it (e.g. NFS, CephFS, EFS, Filestore, Azure Files), or disable the cache"
    )


def parse_secret_ref(ref: Any) -> SecretKeyRef:
    if not isinstance(ref, Mapping) or not ref.get("name"):
        raise InvalidSpecError("spec.apiKeySecretRef needs the Secret's name (and optionally its key)")
    return SecretKeyRef(name=str(ref["name"]), key=str(ref.get("key", "api-key")))


def parse_spec(spec: Mapping[str, Any]) -> LLMDeploymentSpec:
    """Validate and default an LLMDeployment's spec; raise InvalidSpecError with a fix-it message."""
    if not isinstance(spec.get("model"), Mapping):
        raise InvalidSpecError("spec.model.source is required, e.g. builtin://smollm2-135m-instruct")
    secret_ref = spec.get("apiKeySecretRef")
    parsed = LLMDeploymentSpec(
        model=parse_model(spec["model"]),
        engine=parse_engine(_section(spec, "engine")),
        resources=parse_resources(spec.get("resources") or {}, "spec.resources"),
        replicas=_int(spec, "replicas", 1, 0, 1000, "spec"),
        autoscaling=parse_autoscaling(_section(spec, "autoscaling")),
        warm_pool_size=_int(_section(spec, "warmPool"), "size", 0, 0, 100, "spec.warmPool"),
        cache=parse_cache(_section(spec, "cache")),
        api_key_secret_ref=parse_secret_ref(secret_ref) if secret_ref else None,
        node_selector=dict(spec.get("nodeSelector") or {}),
        tolerations=tuple(spec.get("tolerations") or ()),
        affinity=spec.get("affinity"),
        priority_class_name=spec.get("priorityClassName"),
        rollout=parse_rollout(_section(spec, "rollout")),
        topology_spread_constraints=(
            None
            if spec.get("topologySpreadConstraints") is None
            else tuple(dict(c) for c in spec["topologySpreadConstraints"])
        ),
        runtime_class_name=spec.get("runtimeClassName"),
        service_account_name=spec.get("serviceAccountName"),
        router=parse_router(_section(spec, "router")),
    )
    check_storage(parsed)
    check_scale_to_zero(parsed)
    tp, gpus = parsed.engine.tensor_parallel_size, parsed.gpu_count
    if tp > 1 and gpus < tp:
        raise InvalidSpecError(
            f"spec.engine.tensorParallelSize is {tp}, but each pod gets {gpus} GPU(s): set "
            f'spec.resources.limits["nvidia.com/gpu"] to at least {tp}'
        )
    return parsed
