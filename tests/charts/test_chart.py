"""The Helm chart, rendered by a real helm v4 binary and checked against the real Kubernetes schemas.

Every rendered core object goes through `kubernetes_validate` (strict: unknown fields are errors).
The PodMonitor (monitoring.coreos.com) is a prometheus-operator CRD that those schemas do not hold, so it
is checked structurally against the fields prometheus-operator documents. Expected names (labels, metric
names, RBAC resources) are written out from ARCHITECTURE.md, not read back from the chart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pagoda_operator import builders, kube, router_builders
from pagoda_operator.spec import parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "pagoda"
CRD_FILE = "llmdeployments.pagoda.dev.yaml"
KUBERNETES_VERSION = "1.37"
# The chart's kubeVersion floor (preStop sleep is on from 1.30), a mid version, and the newest schemas.
SUPPORTED_VERSIONS = ("1.30", "1.33", KUBERNETES_VERSION)
RELEASE_NAMESPACE = "pagoda-system"

ALL_FEATURES = {
    "watchNamespaces": ["ml-team", "research"],
    "logLevel": "debug",
    "metrics": {
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusAdapter": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
    "imagePullSecrets": [{"name": "registry"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "extraEnv": [{"name": "EXTRA", "value": "1"}],
}
# ARCHITECTURE.md section 3 (engine metrics) and section 4 (HPA custom-metric names, engine pod labels).
ENGINE_METRICS = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total", "vllm:request_success_total", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
}
HPA_METRICS = {"vllm_num_requests_waiting": "vllm:num_requests_waiting",
               "vllm_kv_cache_usage_perc": "vllm:kv_cache_usage_perc"}
ENGINE_POD_LABELS = {"app.kubernetes.io/name": "pagoda", "app.kubernetes.io/managed-by": "pagoda-operator"}
ROUTER_POD_LABELS = {"app.kubernetes.io/name": "pagoda-router",
                     "app.kubernetes.io/managed-by": "pagoda-operator"}


@cache
def helm_binary() -> str:
    """helm from PATH or tools/helm; missing helm is a failure, because CI must run these checks."""
    found = shutil.which("helm") or next(
        (str(p) for p in [REPO_ROOT / "tools" / "helm" / "helm"] if p.is_file()), None)
    if found is None:
        pytest.fail("helm not found on PATH or at tools/helm/helm: run `bash tools/get-helm.sh tools/helm` "
                    "(or `make test`, which does)")
    version = subprocess.run([found, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v4."), f"expected helm v4, got {version!r}"
    return found


def helm(*args: str, values: dict[str, Any] | None = None, tmp_path: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [helm_binary(), *args]
    if values is not None:
        assert tmp_path is not None
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        command += ["-f", str(values_file)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def render(tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    result = helm("template", "pagoda", str(CHART), "--namespace", RELEASE_NAMESPACE, "--include-crds",
                  values=values or {}, tmp_path=tmp_path)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


@pytest.fixture(params=["defaults", "all-features"])
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> list[dict[str, Any]]:
    return render(tmp_path, ALL_FEATURES if request.param == "all-features" else None)


def test_helm_is_v4() -> None:
    helm_binary()


@pytest.mark.parametrize("features", [False, True], ids=["defaults", "all-features"])
def test_helm_lint(features: bool, tmp_path: Path) -> None:
    result = helm("lint", "--strict", str(CHART), values=ALL_FEATURES if features else {}, tmp_path=tmp_path)
    assert "0 chart(s) failed" in result.stdout


def test_chart_crd_is_the_repository_crd() -> None:
    source, copy = REPO_ROOT / "crds" / CRD_FILE, CHART / "crds" / CRD_FILE
    assert source.is_file(), f"{source} is missing"
    assert copy.is_file() and copy.read_bytes() == source.read_bytes(), (
        f"the chart's CRD differs from crds/: run `cp crds/{CRD_FILE} charts/pagoda/crds/{CRD_FILE}`")


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_every_object_validates_against_kubernetes_schemas(
    rendered: list[dict[str, Any]], version: str
) -> None:
    kinds = set()
    for obj in rendered:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            check_pod_monitor(obj)
            continue
        if obj["apiVersion"] == "kopf.dev/v1":
            check_peering(obj, rendered)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(map(str, err.path))
            pytest.fail(f"{version}: {obj['kind']}/{obj['metadata']['name']}: {where}: {err.message}")
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds


def check_peering(obj: dict[str, Any], rendered: list[dict[str, Any]]) -> None:
    """kopf's peering objects: their CRD ships with the chart, and they hold nothing but metadata."""
    crds = {c["spec"]["names"]["kind"]: c for c in by_kind(rendered, "CustomResourceDefinition")}
    assert obj["kind"] in crds and crds[obj["kind"]]["spec"]["group"] == "kopf.dev"
    assert (crds[obj["kind"]]["spec"]["scope"] == "Namespaced") == ("namespace" in obj["metadata"])
    assert set(obj) == {"apiVersion", "kind", "metadata"}


def check_pod_monitor(obj: dict[str, Any]) -> None:
    """PodMonitor fields as prometheus-operator's monitoring.coreos.com/v1 API defines them."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "PodMonitor"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel",
                         "podTargetLabels"}
    assert spec["selector"] in ({"matchLabels": ENGINE_POD_LABELS}, {"matchLabels": ROUTER_POD_LABELS})
    selector = spec["namespaceSelector"]
    assert selector == {"any": True} or set(selector) == {"matchNames"}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "portNumber", "path", "interval", "scrapeTimeout", "relabelings",
                             "metricRelabelings", "scheme", "honorLabels"}
    assert endpoint["path"] == "/metrics" and isinstance(endpoint["port"], str)
    for relabeling in endpoint.get("relabelings", []):
        assert set(relabeling) <= {"sourceLabels", "targetLabel", "regex", "replacement", "action",
                                   "separator"}


def test_all_features_renders_the_optional_objects(tmp_path: Path) -> None:
    objects = render(tmp_path, ALL_FEATURES)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("PodMonitor", "pagoda-engines") in names
    assert ("PodMonitor", "pagoda-routers") in names
    assert ("ConfigMap", "pagoda-prometheus-adapter") in names
    assert ("ConfigMap", "pagoda-dashboard") in names
    default_names = {(o["kind"], o["metadata"]["name"]) for o in render(tmp_path)}
    assert ("PodMonitor", "pagoda-engines") not in default_names
    assert ("ConfigMap", "pagoda-prometheus-adapter") not in default_names


# ------------------------------------------------------------------------------------- operator pod


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_operator_runs_kopf_with_peering_over_the_watched_namespaces(tmp_path: Path) -> None:
    objects = render(tmp_path)
    cluster_wide = operator_container(objects)
    assert cluster_wide["command"] == ["kopf", "run"]
    wanted = {"--module=pagoda_operator.handlers", "--peering=pagoda", "--all-namespaces"}
    assert wanted <= set(cluster_wide["args"]) and "--standalone" not in cluster_wide["args"]
    (peering,) = by_kind(objects, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "pagoda"

    objects = render(tmp_path, ALL_FEATURES)
    namespaced = operator_container(objects)["args"]
    assert "--all-namespaces" not in namespaced
    assert {"--namespace=ml-team", "--namespace=research", "--peering=pagoda", "--debug"} <= set(namespaced)
    peerings = by_kind(objects, "KopfPeering")
    assert {p["metadata"]["namespace"] for p in peerings} == {"ml-team", "research"}
    assert not by_kind(objects, "ClusterKopfPeering")


def test_operator_pod_is_locked_down(tmp_path: Path) -> None:
    objects = render(tmp_path)
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    # Highly available: two replicas on different nodes, kopf's peering keeps one active.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = operator_container(objects)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]


@pytest.mark.parametrize(("version", "installs"), [("1.29.10", False), ("1.30.0", True), ("1.33.1", True)])
def test_chart_requires_kubernetes_1_30(version: str, installs: bool, tmp_path: Path) -> None:
    """The engine pods' preStop `sleep` action is alpha and off in 1.29: helm refuses such a cluster."""
    result = helm("template", "pagoda", str(CHART), "--kube-version", version, check=False)
    assert (result.returncode == 0) is installs, result.stderr
    if not installs:
        assert "kubeVersion" in result.stderr or "incompatible" in result.stderr


def test_engine_uid_can_be_left_to_the_platform(tmp_path: Path) -> None:
    """OpenShift assigns a UID per namespace: the operator pod and the engine pods can run as any."""
    env = {e["name"]: e.get("value") for e in operator_container(render(tmp_path))["env"]}
    assert env["PAGODA_ENGINE_RUN_AS_USER"] == "10001"
    values = {
        "engineSecurity": {"runAsUser": ""},
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
    }
    objects = render(tmp_path, values)
    env = {e["name"]: e.get("value") for e in operator_container(objects)["env"]}
    assert env["PAGODA_ENGINE_RUN_AS_USER"] == ""
    (deployment,) = by_kind(objects, "Deployment")
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True and not {"runAsUser", "runAsGroup", "fsGroup"} & set(context)


# ------------------------------------------------------------------------------------------------ RBAC


def rules_of(role: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    yield group, resource, verb


# What the operator does, from the brief: kopf watches and patches LLMDeployments (+ status, + scale),
# manages the children, labels pods, posts events; kopf follows namespaces and CRDs cluster-wide.
REQUIRED_NAMESPACED = {
    ("pagoda.dev", "llmdeployments", v) for v in ("get", "list", "watch", "patch")} | {
    ("pagoda.dev", "llmdeployments/status", "patch"), ("pagoda.dev", "llmdeployments/scale", "patch")} | {
    # Children are server-side applied: get, then create or patch; never listed, watched or replaced.
    (g, r, v) for g, r in [("apps", "deployments"), ("", "services"), ("policy", "poddisruptionbudgets"),
                           ("autoscaling", "horizontalpodautoscalers")]
    for v in ("get", "create", "patch")} | {
    ("", "persistentvolumeclaims", "get"), ("", "persistentvolumeclaims", "create"),  # never patched
    ("autoscaling", "horizontalpodautoscalers", "delete")} | {
    ("", "pods", v) for v in ("list", "watch", "patch")} | {("", "events", "create"), ("", "events", "list"),
                                                             ("events.k8s.io", "events", "create")} | {
    # blockOwnerDeletion on the children needs it where owner-reference permissions are enforced.
    ("pagoda.dev", "llmdeployments/finalizers", "update")} | {
    # The router's children, deleted when spec.router drops them; the router's Role is granted, so held.
    (g, r, v) for g, r in [("apps", "deployments"), ("", "services"), ("", "serviceaccounts"),
                           ("policy", "poddisruptionbudgets"),
                           ("rbac.authorization.k8s.io", "roles"),
                           ("rbac.authorization.k8s.io", "rolebindings"),
                           ("inference.networking.k8s.io", "inferencepools")]
    for v in ("get", "create", "patch", "delete")} | {
    ("discovery.k8s.io", "endpointslices", v) for v in ("get", "list", "watch")}
REQUIRED_CLUSTER = {("", "namespaces", "list"), ("", "namespaces", "watch"),
                    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                    ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}
# kopf's peering: the replicas meet on one object, cluster-wide or per watched namespace.
CLUSTER_PEERING = {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
NAMESPACED_PEERING = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
ALLOWED_GROUPS = {"", "apps", "autoscaling", "policy", "pagoda.dev", "apiextensions.k8s.io", "events.k8s.io",
                  "kopf.dev", "rbac.authorization.k8s.io", "discovery.k8s.io", "inference.networking.k8s.io"}
FORBIDDEN_RESOURCES = {"secrets", "configmaps", "nodes", "pods/exec"}


def assert_least_privilege(triples: set[tuple[str, str, str]]) -> None:
    assert not any("*" in t for t in triples), "no wildcards"
    assert {g for g, _, _ in triples} <= ALLOWED_GROUPS
    assert not {r for _, r, _ in triples} & FORBIDDEN_RESOURCES
    assert not {v for _, _, v in triples} & {"escalate", "bind", "impersonate", "deletecollection"}
    too_much = {("pods", "delete"), ("pods", "create"), ("namespaces", "get"),
                ("customresourcedefinitions", "get")}
    assert not {(r, v) for _, r, v in triples} & too_much


def test_rbac_cluster_wide_mode(tmp_path: Path) -> None:
    objects = render(tmp_path)
    (cluster_role,) = by_kind(objects, "ClusterRole")
    assert not by_kind(objects, "Role")
    triples = set(rules_of(cluster_role))
    assert triples == REQUIRED_NAMESPACED | REQUIRED_CLUSTER | CLUSTER_PEERING, "exactly what it uses"
    assert_least_privilege(triples)
    assert_bound_to_operator(objects, cluster_role, "ClusterRoleBinding")


def test_rbac_namespaced_mode(tmp_path: Path) -> None:
    objects = render(tmp_path, ALL_FEATURES)
    (cluster_role,) = by_kind(objects, "ClusterRole")
    assert set(rules_of(cluster_role)) == REQUIRED_CLUSTER, "only kopf's own needs stay cluster-wide"
    assert_bound_to_operator(objects, cluster_role, "ClusterRoleBinding")
    roles = by_kind(objects, "Role")
    assert {r["metadata"]["namespace"] for r in roles} == set(ALL_FEATURES["watchNamespaces"])
    for role in roles:
        triples = set(rules_of(role))
        assert triples == REQUIRED_NAMESPACED | NAMESPACED_PEERING
        assert_least_privilege(triples)
        assert_bound_to_operator(objects, role, "RoleBinding")


def assert_bound_to_operator(objects: list[dict[str, Any]], role: dict[str, Any], binding_kind: str) -> None:
    (service_account,) = by_kind(objects, "ServiceAccount")
    (deployment,) = by_kind(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == service_account["metadata"]["name"]
    bindings = [b for b in by_kind(objects, binding_kind)
                if b["roleRef"]["name"] == role["metadata"]["name"]
                and b["metadata"].get("namespace") == role["metadata"].get("namespace")]
    assert len(bindings) == 1
    assert bindings[0]["subjects"] == [{"kind": "ServiceAccount", "name": service_account["metadata"]["name"],
                                        "namespace": RELEASE_NAMESPACE}]


# ---------------------------------------------------------------------------------- values schema


@pytest.mark.parametrize("bad_values", [
    {"logLevel": "loud"},
    {"watchNamespaces": ["Not_A_Namespace"]},
    {"metrics": {"podMonitor": {"enabled": "yes"}}},
    {"image": {"repository": ""}},
    {"resources": {"limits": {"memory": "lots"}}},
    {"typoKey": 1},
])
def test_values_schema_rejects_bad_values(bad_values: dict[str, Any], tmp_path: Path) -> None:
    result = helm("template", "pagoda", str(CHART), values=bad_values, tmp_path=tmp_path, check=False)
    assert result.returncode != 0 and "schema" in result.stderr.lower(), result.stderr


# ----------------------------------------------------------------------------- metrics integration


def test_prometheus_adapter_rules_serve_the_hpa_metrics(tmp_path: Path) -> None:
    objects = render(tmp_path, ALL_FEATURES)
    (config_map,) = [o for o in objects if o["metadata"]["name"].endswith("prometheus-adapter")]
    rules = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    served = {}
    for rule in rules:
        assert rule["seriesQuery"].startswith(rule["name"]["matches"].strip("^$") + "{")
        overrides = rule["resources"]["overrides"]
        assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
        assert "<<.GroupBy>>" in rule["metricsQuery"]
        served[rule["name"]["as"]] = rule["name"]["matches"].strip("^$")
    assert served == HPA_METRICS
    assert config_map["metadata"]["namespace"] == RELEASE_NAMESPACE


def test_prometheus_adapter_rules_land_in_the_adapters_namespace(tmp_path: Path) -> None:
    """prometheus-adapter's `rules.existing` mounts a ConfigMap from its own namespace."""
    values = {"metrics": {"prometheusAdapter": {"enabled": True, "namespace": "monitoring"}}}
    objects = render(tmp_path, values)
    (config_map,) = [o for o in objects if o["metadata"]["name"].endswith("prometheus-adapter")]
    assert config_map["metadata"]["namespace"] == "monitoring"


def test_grafana_dashboard_charts_the_engine_metrics(tmp_path: Path) -> None:
    (config_map,) = [o for o in render(tmp_path) if o["metadata"]["name"].endswith("dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["pagoda-vllm.json"])
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    expressions = [t["expr"] for p in panels for t in p["targets"]]
    used_metrics = {word for expr in expressions for word in _metric_names(expr)}
    assert used_metrics <= ENGINE_METRICS, f"unknown metrics: {used_metrics - ENGINE_METRICS}"
    for must_chart in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                       "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                       "vllm:e2e_request_latency_seconds_bucket", "vllm:generation_tokens_total",
                       "vllm:num_preemptions_total"):
        assert must_chart in used_metrics, must_chart
    assert any("histogram_quantile(0.99" in e for e in expressions)
    cells = [(x, y) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), "panels overlap"


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bvllm:[a-z0-9_]+", expr))


# ---------------------------------------------------------------------------------------- NOTES


@cache
def notes() -> str:
    result = subprocess.run([helm_binary(), "install", "pagoda", str(CHART), "--namespace", RELEASE_NAMESPACE,
                             "--dry-run=client"], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_tell_the_next_commands() -> None:
    text = notes()
    assert "kubectl -n pagoda-system rollout status deployment/pagoda" in text
    assert "kind: LLMDeployment" in text and "port-forward svc/smollm2 8000:8000" in text


def test_notes_example_is_a_valid_llmdeployment() -> None:
    """The CR that NOTES.txt tells users to apply passes the CRD's own OpenAPI schema."""
    import jsonschema

    crd = yaml.safe_load((REPO_ROOT / "crds" / CRD_FILE).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    text = notes()
    manifest = text.split("<<'YAML'\n", 1)[1].split("\n  YAML", 1)[0]
    resource = yaml.safe_load("\n".join(line.removeprefix("  ") for line in manifest.splitlines()))
    assert resource["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
    # A CRD's schema is OpenAPI 3.0, whose keywords (boolean exclusiveMinimum) are JSON Schema draft 4's.
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    jsonschema.Draft4Validator(spec_schema).validate(resource["spec"])


# ---------------------------------------------------------------------------------------------- router


def test_pod_monitors_select_the_pods_the_operator_builds(tmp_path: Path) -> None:
    """Engines and routers as the operator's builders label them, and nothing else."""
    spec = parse_spec({"model": {"source": "builtin://smollm2-135m-instruct"}})
    engines = builders.build_deployment("demo", "ml", spec)
    router = router_builders.build_router_deployment("demo", "ml", spec, "image", None)
    pods = {"engines": engines, "routers": router}
    objects = render(tmp_path, ALL_FEATURES)
    for monitor in by_kind(objects, "PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        for component, deployment in pods.items():
            selected = selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
            assert selected == monitor["metadata"]["name"].endswith(component)
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        for deployment in pods.values():
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            assert endpoint["port"] in {port["name"] for port in container["ports"]}


def test_prometheus_adapter_serves_the_routers_pending_requests_as_an_external_metric(tmp_path: Path) -> None:
    objects = render(tmp_path, ALL_FEATURES)
    (config_map,) = [o for o in objects if o["metadata"]["name"].endswith("prometheus-adapter")]
    (rule,) = yaml.safe_load(config_map["data"]["config.yaml"])["externalRules"]
    assert rule["seriesQuery"].startswith("pagoda_router_pending_requests{")
    assert rule["name"]["as"] == "pagoda_router_pending_requests"
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}}
    assert rule["metricsQuery"].startswith("sum(")  # held requests add up over the router replicas
    # The HPA the operator builds asks for that name, by the label the PodMonitor writes.
    spec = parse_spec({"model": {"source": "builtin://smollm2-135m-instruct"},
                       "autoscaling": {"enabled": True, "mode": "hpa", "minReplicas": 0}})
    hpa = builders.build_hpa("demo", "ml", spec)
    (external,) = [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    assert external["metric"]["name"] == rule["name"]["as"]
    relabeled = {r["targetLabel"] for m in by_kind(objects, "PodMonitor")
                 for r in m["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    assert set(external["metric"]["selector"]["matchLabels"]) <= relabeled


def test_operator_rbac_covers_what_the_router_children_need(tmp_path: Path) -> None:
    """It creates, patches and deletes every router child, and holds what the router's Role grants
    (the API server refuses to let a subject grant more than it holds, short of `escalate`)."""
    (cluster_role,) = by_kind(render(tmp_path), "ClusterRole")
    held = set(rules_of(cluster_role))
    spec = parse_spec({"model": {"source": "builtin://smollm2-135m-instruct"}, "router": {"mode": "gateway"}})
    for child in router_builders.build_router_children("demo", "ml", spec, "image", None):
        group = child["apiVersion"].rpartition("/")[0]
        resource = kube.RESOURCES_BY_KIND[child["kind"]].plural
        assert {(group, resource, v) for v in ("get", "create", "patch", "delete")} <= held, child["kind"]
    role = router_builders.build_router_role("demo", "ml")
    assert set(rules_of(role)) <= held


def test_router_image_reaches_the_operator(tmp_path: Path) -> None:
    env = {e["name"]: e.get("value") for e in operator_container(render(tmp_path))["env"]}
    assert env["PAGODA_ROUTER_IMAGE"] == ""  # the engine image then
    values = {"routerImage": {"repository": "registry/router", "tag": "2"}}
    env = {e["name"]: e.get("value") for e in operator_container(render(tmp_path, values))["env"]}
    assert env["PAGODA_ROUTER_IMAGE"] == "registry/router:2"


def test_hub_endpoint_and_token_reach_the_operator(tmp_path: Path) -> None:
    """The operator resolves hf:// branches to commits on the Hub: HF_ENDPOINT and HF_TOKEN (from a Secret
    in its own namespace: it holds no Secret rights) as pagoda-fetch reads them."""
    env = {e["name"]: e for e in operator_container(render(tmp_path))["env"]}
    assert "HF_ENDPOINT" not in env and "HF_TOKEN" not in env
    values = {"huggingface": {"endpoint": "https://hf-mirror.example.com",
                              "tokenSecret": {"name": "hub-token", "key": "token"}}}
    env = {e["name"]: e for e in operator_container(render(tmp_path, values))["env"]}
    assert env["HF_ENDPOINT"]["value"] == "https://hf-mirror.example.com"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hub-token", "key": "token"}}
