"""The Helm chart: lint, render in both RBAC modes, values validated by the schema, and the rendered manifests
accepted by a real API server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from ragtune.rbac import RULES, split_rules

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ragtune"


@pytest.fixture(scope="session")
def helm() -> Path:
    result = subprocess.run(["bash", str(ROOT / "hack" / "build-helm.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def render(helm: Path, *args: str, check: bool = True,
           namespace: str = "ragtune-system") -> subprocess.CompletedProcess:
    result = subprocess.run([str(helm), "template", "rt", str(CHART), "--namespace", namespace,
                             "--kube-version", "v1.34.4", *args],
                            capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def objects(text: str) -> list[dict]:
    return [o for o in yaml.safe_load_all(text) if o]


def by_kind(objs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def operator_role(kinds: dict[str, list[dict]]) -> dict:
    """The operator's ClusterRole (the others add ragtune objects to the default user roles)."""
    (role,) = [o for o in kinds["ClusterRole"]
               if not any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in o["metadata"]["labels"])]
    return role


def test_chart_lints_clean(helm):
    result = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_install_is_cluster_wide_with_the_operators_own_rules(helm):
    kinds = by_kind(objects(render(helm).stdout))
    assert operator_role(kinds)["rules"] == RULES
    binding = kinds["ClusterRoleBinding"][0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rt-ragtune", "namespace": "ragtune-system"}]
    assert "Role" not in kinds
    deployment = kinds["Deployment"][0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["image"] == "ragtune/operator:0.1.0"
    assert not any(a.startswith("--namespace") for a in container["args"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RAGTUNE_SERVE_IMAGE"] == "ragtune/serve:0.1.0"
    assert kinds["Service"][0]["spec"]["ports"][0]["port"] == 8080
    assert kinds["ClusterKopfPeering"][0]["metadata"]["name"] == env["RAGTUNE_PEERING"] == "ragtune"


def test_single_namespace_mode_uses_roles_in_the_served_namespaces(helm):
    kinds = by_kind(objects(render(helm, "--set", "watchNamespaces={team-a,team-b}").stdout))
    namespaced, cluster = split_rules()
    roles = kinds["Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == namespaced for r in roles)
    assert operator_role(kinds)["rules"] == cluster
    args = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert sorted(p["metadata"]["namespace"] for p in kinds["KopfPeering"]) == ["team-a", "team-b"]


@pytest.mark.parametrize("flag,field", [
    ("replicaCount=two", "replicaCount"),
    ("image.pullPolicy=Sometimes", "pullPolicy"),
    ("watchNamespaces={Bad_Name}", "watchNamespaces"),
    ("unknownKey=1", "unknownKey"),
    ("metrics.serviceMonitor.interval=often", "interval"),
])
def test_the_values_schema_refuses_bad_values(helm, flag, field):
    result = render(helm, "--set", flag, check=False)
    assert result.returncode != 0
    assert field in result.stderr


def test_names_can_be_overridden_and_the_chart_works_as_a_subchart(helm):
    """Helm passes a subchart `global`; nameOverride and fullnameOverride are the usual knobs."""
    kinds = by_kind(objects(render(helm, "--set", "fullnameOverride=ml-operator", "--set", "global.x=1").stdout))
    assert kinds["Deployment"][0]["metadata"]["name"] == "ml-operator"
    assert operator_role(kinds)["metadata"]["name"] == "ml-operator"
    named = by_kind(objects(render(helm, "--set", "nameOverride=tuner").stdout))
    deployment = named["Deployment"][0]
    assert deployment["metadata"]["name"] == "rt-tuner"
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "tuner"


def test_replicas_get_a_disruption_budget_and_security_contexts_can_be_set(helm):
    assert "PodDisruptionBudget" not in by_kind(objects(render(helm).stdout))
    kinds = by_kind(objects(render(helm, "--set", "replicaCount=2").stdout))
    pdb = kinds["PodDisruptionBudget"][0]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == kinds["Deployment"][0]["spec"]["selector"]["matchLabels"]
    openshift = by_kind(objects(render(helm, "--set", "podSecurityContext.runAsUser=null",
                                       "--set", "podSecurityContext.runAsGroup=null").stdout))
    pod = openshift["Deployment"][0]["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_workload_pull_secrets_reach_the_operator(helm):
    kinds = by_kind(objects(render(helm, "--set", "workloadImagePullSecrets[0].name=regcred",
                                   "--set", "workloadImagePullSecrets[1].name=mirror").stdout))
    env = {e["name"]: e.get("value") for e in kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAGTUNE_WORKLOAD_IMAGE_PULL_SECRETS"] == "regcred,mirror"
    assert "RAGTUNE_WORKLOAD_IMAGE_PULL_SECRETS" not in {
        e["name"] for e in by_kind(objects(render(helm).stdout))["Deployment"][0]["spec"]["template"]["spec"]
        ["containers"][0]["env"]}


def test_chart_crds_are_the_generated_ones():
    for crd in (ROOT / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text()


def test_rendered_chart_is_accepted_by_the_api_server(helm, kube, crds):
    text = render(helm, "--set", "watchNamespaces={default}", namespace="default").stdout
    result = kube.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", stdin=text, check=False)
    assert result.returncode == 0, result.stderr


PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.89.0"


@pytest.fixture
def servicemonitor_crd(kube):
    """The Prometheus Operator's own ServiceMonitor CRD, from its module on the Go module proxy."""
    kube.install_module_crd(PROMETHEUS_OPERATOR,
                            "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
                            "servicemonitors.monitoring.coreos.com")
    yield
    kube.remove_crd("servicemonitors.monitoring.coreos.com")


def test_service_monitors_scrape_the_operator_and_every_endpoint(helm, kube, crds, servicemonitor_crd):
    from ragtune.api.hybridendpoint import HybridEndpointSpec
    from ragtune.builders import common, endpoint

    assert "ServiceMonitor" not in by_kind(objects(render(helm).stdout))  # off unless asked for
    flags = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.serviceMonitor.labels.release=prom",
             "--set", "metrics.serviceMonitor.interval=15s", "--set", "metrics.endpointsServiceMonitor.enabled=true"]
    kinds = by_kind(objects(render(helm, *flags).stdout))
    operator, endpoints = kinds["ServiceMonitor"]
    assert operator["metadata"]["labels"]["release"] == "prom"
    assert operator["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    # each selects what it should: the operator's metrics Service, and the Service of any HybridEndpoint
    metrics_service = kinds["Service"][0]
    assert operator["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert [p["name"] for p in metrics_service["spec"]["ports"]] == ["metrics"]
    owner = common.owner_info({"kind": "HybridEndpoint", "metadata": {"name": "chat", "namespace": "team-a"}})
    spec = HybridEndpointSpec.model_validate({"mode": "rag", "retrieval": {"vectorIndexRef": {"name": "docs"}}})
    for runtime in ("deployment", "rayservice"):
        service = endpoint.service(owner, spec, endpoint.names(owner), common.labels(owner, endpoint.COMPONENT),
                                   runtime)
        assert endpoints["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert [p["name"] for p in service["spec"]["ports"]] == [endpoints["spec"]["endpoints"][0]["port"]]
        assert service["metadata"]["annotations"]["prometheus.io/port"] == str(spec.port)
    assert endpoints["spec"]["namespaceSelector"] == {"any": True}
    served = by_kind(objects(render(helm, *flags, "--set", "watchNamespaces={team-a}").stdout))["ServiceMonitor"][1]
    assert served["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    # the API server takes them as the Prometheus Operator's CRD defines them
    text = render(helm, *flags, "--set", "watchNamespaces={default}", namespace="default").stdout
    result = kube.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", stdin=text, check=False)
    assert result.returncode == 0, result.stderr
    # and a ServiceMonitor without the Service it scrapes is refused when rendering
    refused = render(helm, "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false",
                     check=False)
    assert refused.returncode != 0 and "metrics.service.enabled" in refused.stderr


def test_default_roles_let_namespace_users_manage_ragtune_objects(helm, kube, crds):
    """Aggregated into Kubernetes' own admin/edit/view (the controller manager aggregates them): an editor of a
    namespace manages its ragtune objects and scales endpoints, a viewer reads them and changes nothing."""
    kinds = by_kind(objects(render(helm, "--set", "rbac.create=false").stdout))
    assert {o["metadata"]["name"] for o in kinds["ClusterRole"]} == {"rt-ragtune-edit", "rt-ragtune-view"}
    assert not {"ClusterRoleBinding", "Role", "RoleBinding"} & set(kinds)  # the operator's own, left to an admin
    assert "ClusterRole" not in by_kind(objects(render(
        helm, "--set", "rbac.create=false", "--set", "rbac.aggregateToDefaultRoles=false").stdout))

    aggregated = kinds["ClusterRole"]
    kube.apply(aggregated)
    namespace = kube.create_namespace("roles")
    try:
        for user, role in (("alice", "edit"), ("bob", "view")):
            kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                        "metadata": {"name": f"{user}-{role}"},
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]},
                       namespace)

        def can(user: str, verb: str, resource: str) -> bool:
            result = kube.kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", user, check=False)
            return result.stdout.strip() == "yes"

        kube.wait_for(lambda: can("alice", "create", "hybridendpoints.ragtune.io"),
                      "the edit role to take in ragtune's rules")
        assert can("alice", "delete", "finetunejobs.ragtune.io") and can("alice", "patch", "vectorindexes.ragtune.io")
        assert can("alice", "update", "hybridendpoints.ragtune.io/scale")
        kube.wait_for(lambda: can("bob", "list", "vectorindexes.ragtune.io"), "the view role to take in ragtune's")
        assert can("bob", "get", "hybridendpoints.ragtune.io")
        assert not can("bob", "create", "hybridendpoints.ragtune.io")
        assert not can("bob", "update", "hybridendpoints.ragtune.io/scale")
    finally:
        kube.delete_namespace(namespace)
        for role in aggregated:
            kube.kubectl("delete", "clusterrole", role["metadata"]["name"], "--ignore-not-found")
