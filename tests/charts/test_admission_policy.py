"""The chart's ValidatingAdmissionPolicy on the operator's service account, rendered by real helm, checked
against the Kubernetes 1.30 and 1.33 schemas, and its CEL evaluated by an independent implementation
(cel-python) as the API server would: matchConditions, then the variables in order, then the validation.

The objects it must allow are the ones the operator's builders really produce (reconcile.child_manifests,
adopted by kopf) and the patches the warm pool really sends (warmpool.PodPatch); the ones it must refuse
are written out here: a foreign Deployment, an unlabelled pod, a take-over by relabelling, a Secret.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
from celpy import celtypes
from test_chart import RELEASE_NAMESPACE, by_kind, render

from pagoda_operator import kube, labels, reconcile
from pagoda_operator.defaults import OperatorDefaults
from pagoda_operator.spec import parse_spec
from pagoda_operator.warmpool import PodPatch

NS = "ml"
OPERATOR = f"system:serviceaccount:{RELEASE_NAMESPACE}:pagoda"
# Everything on, so that every kind of child the operator can write is among them.
FULL_SPEC = {
    "model": {"source": "hf://org/model"},
    "autoscaling": {"enabled": True, "mode": "hpa"},
    "cache": {"enabled": True},
    "router": {"mode": "gateway"},
}
LLMD = {
    "apiVersion": "pagoda.dev/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "demo", "namespace": NS, "uid": "uid-demo", "labels": {"team": "ml"}},
    "spec": FULL_SPEC,
}


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(tmp_path_factory.mktemp("chart"))


@pytest.fixture(scope="module")
def policy(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = by_kind(objects, "ValidatingAdmissionPolicy")
    return found


# ------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("version", ["1.30", "1.33"])
def test_policy_and_binding_validate_against_kubernetes_schemas(
    objects: list[dict[str, Any]], version: str
) -> None:
    found = by_kind(objects, "ValidatingAdmissionPolicy") + by_kind(
        objects, "ValidatingAdmissionPolicyBinding"
    )
    assert [o["apiVersion"] for o in found] == ["admissionregistration.k8s.io/v1"] * 2
    for obj in found:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_binding_denies_and_the_policy_fails_closed(objects: list[dict[str, Any]]) -> None:
    (policy_,) = by_kind(objects, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy_["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"] and "paramRef" not in binding["spec"]
    assert policy_["spec"]["failurePolicy"] == "Fail"
    # Every write to every resource and subresource is matched: only the CEL below lets one through.
    (rule,) = policy_["spec"]["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["*"] and rule["resources"] == ["*/*"]
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE", "CONNECT"}


def test_the_policy_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    values = {"admissionPolicy": {"enabled": False}}
    kinds = {o["kind"] for o in render(tmp_path, values)}
    assert not {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} & kinds


def test_it_names_the_service_account_the_operator_runs_as(
    objects: list[dict[str, Any]], policy: dict[str, Any]
) -> None:
    (deployment,) = by_kind(objects, "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    request = make_request(
        "CREATE", "Secret", "x", user=f"system:serviceaccount:{RELEASE_NAMESPACE}:{account}"
    )
    assert admit(policy, request, {"metadata": {"name": "x"}}, None) is False


# ----------------------------------------------------------------------------------------------- CEL

PLURALS = {
    "Secret": ("v1", "secrets"),
    "ConfigMap": ("v1", "configmaps"),
    "Event": ("v1", "events"),
    "ClusterKopfPeering": ("kopf.dev/v1", "clusterkopfpeerings"),
}


def make_request(
    operation: str, kind: str, name: str, subresource: str = "", user: str = OPERATOR, namespace: str = NS
) -> dict[str, Any]:
    """An admission request's `request` as the API server fills it for a namespaced object."""
    if kind == "LLMDeployment":
        api_version, plural = "pagoda.dev/v1alpha1", "llmdeployments"
    elif kind in PLURALS:
        api_version, plural = PLURALS[kind]
    else:
        resource = kube.RESOURCES_BY_KIND[kind]
        api_version, plural = resource.api_version, resource.plural
    group, _, version = api_version.rpartition("/")
    return {
        "operation": operation,
        "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": plural},
        "subResource": subresource,
        "name": name,
        "namespace": namespace,
        "userInfo": {"username": user, "groups": ["system:serviceaccounts"]},
    }


def run(expression: str, activation: dict[str, Any]) -> Any:
    """One CEL expression; an evaluation error fails the test (with failurePolicy Fail the API server
    would refuse the request, whatever the expression meant)."""
    env = celpy.Environment()
    result = env.program(env.compile(expression)).evaluate(activation)
    assert not isinstance(result, celpy.CELEvalError), (expression, result)
    return result


def admit(
    policy: dict[str, Any], request: dict[str, Any], obj: dict[str, Any] | None, old: dict[str, Any] | None
) -> bool | None:
    """True: admitted; False: denied; None: the policy does not look at this request."""
    spec = policy["spec"]
    activation: dict[str, Any] = {
        "request": celpy.json_to_cel(request),
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old),
    }
    if not all(run(c["expression"], activation) for c in spec["matchConditions"]):
        return None
    variables: dict[celtypes.StringType, Any] = {}
    for variable in spec["variables"]:
        activation["variables"] = celtypes.MapType(variables)
        variables[celtypes.StringType(variable["name"])] = run(variable["expression"], activation)
    activation["variables"] = celtypes.MapType(variables)
    admitted = all(run(v["expression"], activation) for v in spec["validations"])
    if not admitted:
        (validation,) = spec["validations"]
        message = run(validation["messageExpression"], activation)
        assert f"refused: {request['operation']}" in message and request["name"] in message
    return admitted


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies the operator's pod patches."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def operator_children() -> list[dict[str, Any]]:
    return reconcile.child_manifests(LLMD, parse_spec(FULL_SPEC), OperatorDefaults.current())


def as_stored(manifest: dict[str, Any]) -> dict[str, Any]:
    stored = copy.deepcopy(manifest)
    stored["metadata"].update({"uid": f"uid-{manifest['kind']}", "resourceVersion": "7"})
    return stored


def engine_pod() -> dict[str, Any]:
    """An engine pod as the replica set creates it from the operator's Deployment template."""
    (deployment,) = [
        m for m in operator_children() if m["metadata"]["name"] == "demo" and m["kind"] == "Deployment"
    ]
    template = deployment["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "demo-5d8f-abcde",
            "namespace": NS,
            "labels": {**template["metadata"]["labels"], "pod-template-hash": "5d8f"},
            "annotations": dict(template["metadata"]["annotations"]),
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "demo-5d8f", "uid": "rs"}
            ],
        },
        "spec": template["spec"],
    }


def test_every_child_the_operator_writes_is_admitted(policy: dict[str, Any]) -> None:
    children = operator_children()
    kinds = {c["kind"] for c in children}
    assert kinds == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "InferencePool",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
    }
    for child in children:
        name = child["metadata"]["name"]
        changed = merge_patch(as_stored(child), {"metadata": {"annotations": {"changed": "1"}}})
        assert admit(policy, make_request("CREATE", child["kind"], name), child, None), child["kind"]
        assert admit(policy, make_request("UPDATE", child["kind"], name), changed, as_stored(child)), name
        assert admit(policy, make_request("DELETE", child["kind"], name), None, as_stored(child)), name


def test_the_warm_pools_pod_patches_are_admitted(policy: dict[str, Any]) -> None:
    pod = engine_pod()
    for serving, cost in ((False, 0), (True, 1000)):
        patch = PodPatch(pod["metadata"]["name"], serving, cost, was_serving=not serving, ready=True)
        patched = merge_patch(pod, patch.body)
        assert patched["metadata"]["labels"][labels.SERVING] == ("true" if serving else "false")
        assert admit(policy, make_request("UPDATE", "Pod", pod["metadata"]["name"]), patched, pod)


def test_the_operators_own_objects_are_admitted(policy: dict[str, Any]) -> None:
    finalized = merge_patch(LLMD, {"metadata": {"finalizers": ["pagoda.dev/finalizer"]}})
    assert admit(policy, make_request("UPDATE", "LLMDeployment", "demo"), finalized, LLMD)
    status = merge_patch(LLMD, {"status": {"replicas": 1}})
    assert admit(policy, make_request("UPDATE", "LLMDeployment", "demo", "status"), status, LLMD)
    scale = {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": "demo"},
        "spec": {"replicas": 2},
    }
    assert admit(policy, make_request("UPDATE", "LLMDeployment", "demo", "scale"), scale, scale)
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "demo.1"}, "reason": "Promoted"}
    assert admit(policy, make_request("CREATE", "Event", "demo.1"), event, None)
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "pagoda"}}
    request = make_request("UPDATE", "ClusterKopfPeering", "pagoda", namespace="")
    assert admit(policy, request, peering, peering)


def foreign_deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "billing", "namespace": NS, "labels": {"app": "billing"}},
        "spec": {"replicas": 3},
    }


def test_writes_outside_what_the_operator_manages_are_denied(policy: dict[str, Any]) -> None:
    foreign = foreign_deployment()
    assert admit(policy, make_request("CREATE", "Deployment", "billing"), foreign, None) is False
    assert admit(policy, make_request("DELETE", "Deployment", "billing"), None, foreign) is False
    scaled = merge_patch(foreign, {"spec": {"replicas": 0}})
    assert admit(policy, make_request("UPDATE", "Deployment", "billing"), scaled, foreign) is False
    # Taking it over by writing the operator's label and an owner reference: the old object is foreign.
    (own,) = [c for c in operator_children() if c["kind"] == "Deployment" and c["metadata"]["name"] == "demo"]
    taken = merge_patch(foreign, {"metadata": {k: own["metadata"][k] for k in ("labels", "ownerReferences")}})
    assert admit(policy, make_request("UPDATE", "Deployment", "billing"), taken, foreign) is False
    # Labelled as the operator's but owned by no LLMDeployment: not one of its children.
    unowned = merge_patch(foreign, {"metadata": {"labels": own["metadata"]["labels"]}})
    assert admit(policy, make_request("CREATE", "Deployment", "billing"), unowned, None) is False
    # Kinds the operator never writes, even labelled and owned as its children are.
    for kind in ("Secret", "ConfigMap"):
        obj = {"apiVersion": "v1", "kind": kind, "metadata": copy.deepcopy(own["metadata"])}
        assert admit(policy, make_request("CREATE", kind, "demo"), obj, None) is False
    for operation in ("CREATE", "DELETE"):
        obj, old = (LLMD, None) if operation == "CREATE" else (None, LLMD)
        assert admit(policy, make_request(operation, "LLMDeployment", "demo"), obj, old) is False


def test_pod_patches_beyond_the_serving_role_are_denied(policy: dict[str, Any]) -> None:
    other = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": NS}, "spec": {}}
    patch = PodPatch("web-1", False, 0, was_serving=True, ready=True).body
    assert admit(policy, make_request("UPDATE", "Pod", "web-1"), merge_patch(other, patch), other) is False
    pod = engine_pod()
    for sneaky in (
        {"metadata": {"labels": {labels.INSTANCE: "someone-else"}}},  # moves it to another Deployment
        {"metadata": {"labels": {labels.MANAGED_BY: None}}},
        {"metadata": {"annotations": {"sidecar.istio.io/inject": "true"}}},
    ):
        assert (
            admit(
                policy, make_request("UPDATE", "Pod", pod["metadata"]["name"]), merge_patch(pod, sneaky), pod
            )
            is False
        )
    name = pod["metadata"]["name"]
    assert admit(policy, make_request("DELETE", "Pod", name), None, pod) is False
    assert admit(policy, make_request("CREATE", "Pod", name), pod, None) is False
    exec_options = {"apiVersion": "v1", "kind": "PodExecOptions", "command": ["sh"]}
    assert admit(policy, make_request("CONNECT", "Pod", name, "exec"), exec_options, None) is False


def test_other_users_are_not_looked_at(policy: dict[str, Any]) -> None:
    foreign = foreign_deployment()
    for user in (
        "kubernetes-admin",
        f"system:serviceaccount:{NS}:default",
        "system:serviceaccount:kube-system:pagoda",
    ):
        request = make_request("DELETE", "Deployment", "billing", user=user)
        assert admit(policy, request, None, foreign) is None
