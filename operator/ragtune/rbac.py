"""The operator's permissions, kept in one place: the chart's ClusterRole (or Role per namespace) is rendered
from these rules, and the tests run the operator under exactly them.

`python -m ragtune.rbac` prints the ClusterRole.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from . import GROUP

WRITE = ["get", "list", "watch", "create", "patch", "update", "delete"]
READ = ["get", "list", "watch"]

RULES: list[dict[str, Any]] = [
    # The three kinds: read, keep finalizers/annotations, write status.
    {"apiGroups": [GROUP], "resources": ["finetunejobs", "vectorindexes", "hybridendpoints"],
     "verbs": ["get", "list", "watch", "patch", "update"]},
    {"apiGroups": [GROUP], "resources": ["finetunejobs/status", "vectorindexes/status", "hybridendpoints/status"],
     "verbs": ["get", "patch", "update"]},
    # Children.
    {"apiGroups": [""], "resources": ["configmaps", "persistentvolumeclaims", "services", "serviceaccounts"],
     "verbs": WRITE},
    {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": WRITE},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": WRITE},
    {"apiGroups": ["ray.io"], "resources": ["rayservices"], "verbs": WRITE},
    # The workloads' Role lets them annotate their own pods; granting it requires holding it.
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
     "verbs": ["get", "list", "watch", "create", "patch", "update"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
    # A Milvus token for dropping a collection under deletion policy Delete.
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    # kopf: which resources exist, which namespaces to serve, and peering between replicas.
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": READ},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": READ},
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": ["get", "list", "watch", "patch"]},
]


def cluster_role(name: str = "ragtune-operator") -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "ragtune"}},
            "rules": RULES}


if __name__ == "__main__":
    yaml.safe_dump(cluster_role(), sys.stdout, sort_keys=False)
