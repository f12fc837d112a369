"""Least privilege: the operator does its whole job under exactly the rules in ragtune.rbac, and no more."""

from __future__ import annotations

import json
import uuid

import pytest
from operator_process import OperatorProcess
from ragtune_objects import (bound_pvc, endpoint, finetunejob, finish_finetune, finish_index, vectorindex,
                             volume_for_claim, wait_ready)

from ragtune.rbac import cluster_role


@pytest.fixture
def operator_identity(kube, tmp_path):
    """A kubeconfig for a ServiceAccount bound to the operator's ClusterRole."""
    suffix = uuid.uuid4().hex[:6]
    ns, role = f"ragtune-system-{suffix}", f"ragtune-operator-{suffix}"
    kube.kubectl("create", "namespace", ns)
    kube.wait_for(lambda: kube._has_default_sa(ns), "the namespace to be ready")
    kube.kubectl("create", "serviceaccount", "ragtune-operator", "-n", ns)
    kube.apply(cluster_role(role))
    kube.kubectl("create", "clusterrolebinding", role, f"--clusterrole={role}",
                 f"--serviceaccount={ns}:ragtune-operator")
    token = kube.kubectl("create", "token", "ragtune-operator", "-n", ns, "--duration=1h").stdout.strip()
    admin = json.loads(kube.kubeconfig.read_text())
    config = {**admin, "users": [{"name": "operator", "user": {"token": token}}],
              "contexts": [{"name": "operator", "context": {"cluster": admin["clusters"][0]["name"],
                                                            "user": "operator"}}],
              "current-context": "operator"}
    path = tmp_path / "operator.kubeconfig"
    path.write_text(json.dumps(config))
    yield path
    kube.kubectl("delete", f"clusterrolebinding/{role}", f"clusterrole/{role}", "--wait=false")
    kube.kubectl("delete", "namespace", ns, "--wait=false")


def test_the_operator_works_under_its_own_cluster_role(kube, namespace, ragtune_operator, operator_identity,
                                                     tmp_path):
    ragtune_operator.stop()  # one operator at a time
    restricted = OperatorProcess(operator_identity, tmp_path)
    restricted.start()
    try:
        bound_pvc(kube, namespace, "adapters")
        volume_for_claim(kube, namespace, "docs-store")
        kube.apply(finetunejob("ft"), namespace)
        kube.apply(vectorindex("docs", schedule="0 3 * * *"), namespace)
        kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)
        kube.wait_for(lambda: kube.get("batch/v1", "Job", "ft", namespace), "the training Job")
        kube.wait_for(lambda: kube.get("batch/v1", "CronJob", "docs-refresh", namespace), "the refresh CronJob")
        kube.wait_for(lambda: kube.get("rbac.authorization.k8s.io/v1", "Role", "ragtune-workload", namespace),
                      "the workloads' Role")
        wait_ready(kube, "HybridEndpoint", "chat", namespace, "False", reason="WaitingForFineTuneJob")
        finish_finetune(kube, namespace, "ft", "sha256:" + "d" * 64)  # the workloads report, the operator follows
        finish_index(kube, namespace, "docs", "v1")
        wait_ready(kube, "HybridEndpoint", "chat", namespace, timeout=90)  # its Deployment and Service written
        assert any(e["kind"] == "FineTuneJob" for e in kube.events(namespace, "ft"))
        # An RBAC denial names the identity and what it cannot do; other 403s (writes into namespaces that other
        # tests are deleting) are not about permissions.
        denials = [line for line in restricted.log_path.read_text().splitlines()
                   if "system:serviceaccount:" in line and " cannot " in line]
        assert not denials, "\n".join(denials[:5])
    finally:
        restricted.stop()
        ragtune_operator.start()
