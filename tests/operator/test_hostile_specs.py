"""Specs the CRD schema admits but Kubernetes would refuse downstream: each is rejected by the schema or CEL,
or by parse_spec with a message (the InvalidSpec condition), never built into a child the API server refuses
or into an exception that fails the handler."""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
from llmd_testkit import BUILTIN, schema_errors
from test_crd import cel_failures, custom_resource

from pagoda_operator import builders, router_builders
from pagoda_operator.spec import InvalidSpecError, parse_spec

K8S_VERSION = "1.32.0"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def admitted(spec: dict[str, Any], name: str = "demo") -> bool:
    doc = custom_resource(spec, name=name)
    return not schema_errors(doc) and not cel_failures(doc)


def children(name: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    parsed = parse_spec(spec)
    return [
        builders.build_deployment(name, "ml", parsed),
        builders.build_service(name, "ml", router=parsed.router.enabled),
        builders.build_pdb(name, "ml"),
        builders.build_hpa(name, "ml", parsed),
        builders.build_cache_pvc(name, "ml", parsed),
        *router_builders.build_router_children(name, "ml", parsed, "image", 10001),
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"resources": {"limits": {"cpu": "-1"}}}, "spec.resources.limits.cpu must not be negative"),
        ({"resources": {"requests": {"memory": -5}}}, "spec.resources.requests.memory must not be negative"),
        ({"router": {"resources": {"requests": {"cpu": "-100m"}}}}, "router.resources.requests.cpu must not"),
        ({"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}}, "cpu must not exceed"),
        ({"resources": {"limits": {"nvidia.com/gpu": "0.5"}}}, "nvidia.com/gpu must be a whole number"),
        ({"resources": {"requests": {"nvidia.com/gpu": 1}}}, "GPUs are never overcommitted"),
        ({"resources": {"requests": {"amd.com/gpu": 1}, "limits": {"amd.com/gpu": 2}}}, "overcommitted"),
        ({"cache": {"enabled": True, "size": "0"}}, "spec.cache.size must be a positive number of bytes"),
        ({"cache": {"size": "-1Gi"}}, "spec.cache.size must be a positive number of bytes"),
        ({"engine": {"kvCacheMemory": "1e5000"}}, "kvCacheMemory must be in (0, 1Ei]"),  # str() of it failed
    ],
)
def test_what_the_api_server_would_refuse_in_the_pod_template_is_an_invalid_spec(
    extra: dict[str, Any], message: str
) -> None:
    spec = {"model": BUILTIN, **extra}
    assert admitted(spec)  # the schema lets it through: the operator must catch it
    with pytest.raises(InvalidSpecError) as error:
        parse_spec(spec)
    assert message in str(error.value)


def test_whole_gpus_requested_as_limited_are_fine() -> None:
    resources = {"requests": {"nvidia.com/gpu": "2", "cpu": "1"}, "limits": {"nvidia.com/gpu": 2, "cpu": "1"}}
    spec = {"model": BUILTIN, "engine": {"tensorParallelSize": 2}, "resources": resources}
    assert admitted(spec) and parse_spec(spec).gpu_count == 2


@pytest.mark.parametrize(
    "autoscaling",
    [
        {"targetWaitingRequests": 1e308},  # once an OverflowError in build_hpa: the handler failed each time
        {"targetWaitingRequests": 0.0001},  # once an HPA target of "0", which the API server refuses
        {"targetKVCacheUsage": 1e-12},
    ],
)
def test_hpa_targets_outside_what_a_quantity_can_say_are_refused(autoscaling: dict[str, Any]) -> None:
    spec = {"model": BUILTIN, "autoscaling": {"enabled": True, "mode": "hpa", **autoscaling}}
    assert schema_errors(custom_resource(spec))
    with pytest.raises(InvalidSpecError):
        parse_spec(spec)


def test_the_extreme_hpa_targets_admitted_make_a_valid_hpa() -> None:
    for waiting, usage in ((0.001, 0.001), (1e6, 1)):
        targets = {"targetWaitingRequests": waiting, "targetKVCacheUsage": usage}
        autoscaling = {"enabled": True, "mode": "hpa", "minReplicas": 0, **targets}
        spec = {"model": BUILTIN, "autoscaling": autoscaling}
        assert admitted(spec)
        hpa = builders.build_hpa("demo", "ml", parse_spec(spec))
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
        targets = [m[m["type"].lower()]["target"]["averageValue"] for m in hpa["spec"]["metrics"]]
        assert targets and all(builders.quantity(0) != t for t in targets), targets


def test_the_longest_name_the_crd_admits_names_valid_children() -> None:
    """<name>-engines names a Service (at most 63 characters): a 56-character name once passed the CRD and
    then failed at the API server on every reconcile."""
    spec = {"model": {"source": "hf://org/model"}, "cache": {"enabled": True}, "router": {"mode": "gateway"}}
    longest = "a" * 55
    assert admitted(spec, longest) and not admitted(spec, longest + "a")
    for child in children(longest, spec):
        name = child["metadata"]["name"]
        if child["kind"] == "Service":
            assert DNS_1035.match(name) and len(name) <= 63, name
        else:
            assert DNS_1123_SUBDOMAIN.match(name) and len(name) <= 253, name
        for value in child["metadata"].get("labels", {}).values():
            assert len(value) <= 63, (child["kind"], value)
        if child["kind"] != "InferencePool":  # no built-in kind: test_router_builders checks its shape
            kubernetes_validate.validate(child, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("args", "refused"),
    [
        (["--po", "9000"], True),  # argparse reads it as --port 9000: the probes would never answer
        (["--hos=127.0.0.1"], True),
        (["--api-k", "secret"], True),  # the key in the pod spec, not the Secret
        (["--ap=secret"], True),
        (["--h"], True),  # ambiguous (--help, --host, --http-read-timeout): an error either way
        (["--hostname", "x"], False),  # no prefix of a reserved flag
        (["--max-num-batched-tokens", "4096", "--async-scheduling"], False),
        (["-p", "--p2"], False),
    ],
)
def test_abbreviations_of_the_reserved_engine_flags_are_refused(args: list[str], refused: bool) -> None:
    from pagoda.cli import build_parser

    spec = {"model": BUILTIN, "engine": {"extraArgs": args}}
    assert admitted(spec) is not refused  # the CRD's CEL rule
    if refused:
        with pytest.raises(InvalidSpecError, match="extraArgs must not set"):
            parse_spec(spec)
        # and it is what the engine's parser would take for the flag (or refuse as ambiguous)
        flag = args[0].split("=", 1)[0]
        serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
        matches = [o for a in serve._actions for o in a.option_strings if o.startswith(flag)]
        assert set(matches) & {"--host", "--port", "--api-key"}
    else:
        parse_spec(spec)


@pytest.mark.parametrize(
    "source",
    [
        "https://[host/model.gguf",  # urlsplit's ValueError once escaped parse_spec: the handler failed
        "https://host]/model.gguf",
        "https://host:99999/model.gguf",
        "https://host/%00.gguf",
    ],
)
def test_https_sources_the_cel_rule_admits_but_no_fetcher_can_use_are_invalid(source: str) -> None:
    spec = {"model": {"source": source}}
    assert admitted(spec)
    with pytest.raises(InvalidSpecError, match="spec.model.source"):
        parse_spec(spec)
