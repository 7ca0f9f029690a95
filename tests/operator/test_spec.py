"""parse_spec: the checks the schema cannot make, and Kubernetes quantities."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from pagoda_operator.spec import InvalidSpecError, parse_quantity, parse_spec

BUILTIN = {"source": "builtin://smollm2-135m-instruct"}


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        # Values from the Kubernetes resource.Quantity documentation.
        ("4Gi", 4 * 2**30),
        ("1G", 10**9),
        ("500M", 5 * 10**8),
        ("128974848", 128974848),
        ("129e6", 129 * 10**6),
        ("123Mi", 123 * 2**20),
        ("1.5Gi", 3 * 2**29),
        ("100m", Decimal("0.1")),
        (1073741824, 2**30),
        ("1Ki", 1024),
        ("1Ei", 2**60),  # once read as an exponent: ValueError
        ("2E", 2 * 10**18),
        ("1E3", 1000),
        ("5e-3", Decimal("0.005")),
    ],
)
def test_quantities(quantity: str | int, expected: int | Decimal) -> None:
    assert parse_quantity(quantity) == expected


@pytest.mark.parametrize(
    # the last two once escaped as decimal.Overflow and ValueError: the handler failed, no status said why
    "quantity", ["lots", "4GB", "", "1.2.3Gi", True, "1e999999999", "1e" + "9" * 5000]
)
def test_bad_quantities(quantity: Any) -> None:
    with pytest.raises(InvalidSpecError):
        parse_quantity(quantity)


def test_defaults() -> None:
    spec = parse_spec({"model": BUILTIN})
    assert spec.replicas == 1 and spec.warm_pool_size == 0
    assert spec.engine.tensor_parallel_size == 1 and spec.engine.shutdown_timeout_seconds == 60
    assert not spec.autoscaling.enabled and spec.autoscaling.mode == "builtin"
    assert not spec.cache.enabled and spec.api_key_secret_ref is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {
                "model": BUILTIN,
                "engine": {"tensorParallelSize": 4},
                "resources": {"limits": {"nvidia.com/gpu": 2}},
            },
            "tensorParallelSize is 4, but each pod gets 2 GPU(s)",
        ),
        (
            {"model": BUILTIN, "engine": {"tensorParallelSize": 2}},
            "tensorParallelSize is 2, but each pod gets 0 GPU(s)",
        ),
        ({"model": BUILTIN, "engine": {"extraArgs": ["--port", "9000"]}}, "extraArgs must not set --port"),
        ({"model": BUILTIN, "engine": {"extraArgs": ["--api-key=abc"]}}, "extraArgs must not set --api-key"),
        ({"model": {"source": "hf://org/name/too/deep"}}, "spec.model.source"),
        ({"model": {"source": "ftp://x/y"}}, "must start with one of"),
        (
            {"model": BUILTIN, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
            "minReplicas (3) must be less",
        ),
        ({"model": BUILTIN, "replicas": "3"}, "spec.replicas must be an integer"),
        ({"model": BUILTIN, "engine": {"kvCacheMemory": "lots"}}, "is not a Kubernetes quantity"),
        ({"model": BUILTIN, "apiKeySecretRef": {"key": "k"}}, "apiKeySecretRef needs the Secret's name"),
        ({}, "spec.model.source is required"),
    ],
)
def test_invalid_specs_say_what_to_fix(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpecError, match=None) as err:
        parse_spec(raw)
    assert message in str(err.value)


def test_tensor_parallelism_with_enough_gpus_is_fine() -> None:
    spec = parse_spec(
        {
            "model": BUILTIN,
            "engine": {"tensorParallelSize": 2},
            "resources": {"limits": {"nvidia.com/gpu": "2"}},
        }
    )
    assert spec.gpu_count == 2


CACHED = {"model": {"source": "hf://org/model"}, "cache": {"enabled": True}}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # Two serving pods may land on two nodes: a single-node volume ends in multi-attach errors.
        ({"replicas": 2, "cache": {"accessMode": "ReadWriteOnce"}}, "ReadWriteOnce attaches the cache"),
        # One pod, but a rollout surges a second one next to it.
        ({"cache": {"accessMode": "ReadWriteOnce"}}, "rollout surge 1"),
        ({"warmPool": {"size": 1}, "cache": {"accessMode": "ReadWriteOncePod"}}, "ReadWriteOncePod"),
        (
            {"autoscaling": {"enabled": True, "maxReplicas": 3}, "cache": {"accessMode": "ReadWriteOnce"}},
            "up to 4 engine pods",
        ),
        ({"rollout": {"maxSurge": 0, "maxUnavailable": 0}}, "cannot both be 0"),
    ],
)
def test_storage_and_rollout_that_cannot_work_are_refused(extra: dict[str, Any], message: str) -> None:
    raw = {**CACHED, **extra, "cache": {**CACHED["cache"], **extra.get("cache", {})}}
    with pytest.raises(InvalidSpecError) as err:
        parse_spec(raw)
    assert message in str(err.value)


def test_single_node_storage_works_for_a_single_pod_that_is_replaced_in_place() -> None:
    for mode in ("ReadWriteOnce", "ReadWriteOncePod"):
        spec = parse_spec(
            {
                **CACHED,
                "cache": {"enabled": True, "accessMode": mode},
                "rollout": {"maxSurge": 0, "maxUnavailable": 1},
            }
        )
        assert spec.max_pods == 1
    assert parse_spec({**CACHED, "replicas": 3, "warmPool": {"size": 2}}).cache.access_mode == "ReadWriteMany"
