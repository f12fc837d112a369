#!/usr/bin/env bash
# Prints (stdout) the YAML that runs the KubeRay operator built by hack/kuberay/build.sh in one namespace:
# ServiceAccount, ClusterRole, ClusterRoleBinding and a one-replica Deployment.
#   bash hack/kuberay/manifests.sh IMAGE NAMESPACE | kubectl apply -f -
# Generated at run time from the config/ folder of the same ray-operator module version build.sh pins
# (config/rbac/role.yaml: the rules from the controllers' kubebuilder markers; config/manager/manager.yaml: args,
# probes, resources, security context), so nothing upstream is copied into the repository.
# Differences from upstream: cluster-scoped names carry the namespace (kuberay-operator-NAMESPACE) so installs in
# two namespaces do not overwrite each other's binding; leader election is off (the binary defaults it on);
# the pod runs as 65532 with a read-only root filesystem and no capabilities.
# Not included: the namespace itself and the CRDs (build.sh's "crds" folder; apply those with --server-side).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "kuberay-manifests: $*" >&2; }
die() { log "$*"; exit 1; }

[[ $# -eq 2 ]] || die "usage: $0 IMAGE NAMESPACE"
image="$1"
namespace="$2"
[[ -n "$image" ]] || die "IMAGE is empty"
[[ "$namespace" =~ ^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || die "NAMESPACE '$namespace' is not a DNS label"

# One pin, in build.sh.
kuberay_version="$(sed -n 's/^kuberay_version="\(v[^"]*\)"$/\1/p' "$here/build.sh")"
module="$(sed -n 's/^module="\([^"]*\)"$/\1/p' "$here/build.sh")"
[[ -n "$kuberay_version" && -n "$module" ]] || die "cannot read kuberay_version/module from $here/build.sh"
command -v go >/dev/null || die "'go' not found; install Go >= 1.24 and retry"
python3 -c 'import yaml' 2>/dev/null || die "python3 with PyYAML is needed (pip install pyyaml)"

dir="$(cd "$here" && go mod download -json "$module@$kuberay_version" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
[[ -n "$dir" && -d "$dir/config" ]] || die "no config/ folder in $module@$kuberay_version ($dir)"

python3 - "$dir/config" "$image" "$namespace" "$kuberay_version" <<'PY'
import sys
from pathlib import Path

import yaml

config, image, namespace, version = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]


def load_one(rel: str, kind: str) -> dict:
    docs = [d for d in yaml.safe_load_all((config / rel).read_text()) if d]
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        sys.exit(f"kuberay-manifests: expected one {kind} in config/{rel}, found {len(found)}")
    return found[0]


# The labels config/default and config/rbac's kustomizations put on every object.
labels = {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"}
meta_labels = {**labels, "app.kubernetes.io/version": version, "app.kubernetes.io/managed-by": "ragtune-hack"}
cluster_name = f"kuberay-operator-{namespace}"

sa = load_one("rbac/service_account.yaml", "ServiceAccount")
sa_name = sa["metadata"]["name"]
sa["metadata"].update(namespace=namespace, labels=dict(meta_labels))

role = load_one("rbac/role.yaml", "ClusterRole")
if not role.get("rules"):
    sys.exit("kuberay-manifests: config/rbac/role.yaml has no rules")
role["metadata"] = {"name": cluster_name, "labels": dict(meta_labels)}

binding = load_one("rbac/role_binding.yaml", "ClusterRoleBinding")
binding["metadata"] = {"name": cluster_name, "labels": dict(meta_labels)}
binding["roleRef"]["name"] = cluster_name
binding["subjects"] = [{"kind": "ServiceAccount", "name": sa_name, "namespace": namespace}]

deploy = load_one("manager/manager.yaml", "Deployment")
deploy["metadata"].update(namespace=namespace, labels={**deploy["metadata"].get("labels", {}), **meta_labels})
spec = deploy["spec"]
spec["replicas"] = 1
spec["selector"]["matchLabels"] = {**spec["selector"].get("matchLabels", {}), **labels}
pod = spec["template"]
pod["metadata"]["labels"] = {**pod["metadata"].get("labels", {}), **labels}
podspec = pod["spec"]
podspec["serviceAccountName"] = sa_name
podspec["securityContext"] = {**podspec.get("securityContext", {}),
                              "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532}
containers = [c for c in podspec["containers"] if c.get("name") == "kuberay-operator"]
if len(containers) != 1:
    sys.exit("kuberay-manifests: no kuberay-operator container in config/manager/manager.yaml")
c = containers[0]
c["image"] = image
c["imagePullPolicy"] = "IfNotPresent"
# The binary enables leader election unless told otherwise; one replica needs none.
args = [a for a in c.get("args", []) if not a.startswith("--enable-leader-election")]
c["args"] = args + ["--enable-leader-election=false"]
c["securityContext"] = {**c.get("securityContext", {}), "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}

print(f"# KubeRay operator {version} in namespace {namespace}, from the config/ folder of "
      f"github.com/ray-project/kuberay/ray-operator@{version} (hack/kuberay/manifests.sh).")
print("# The CRDs come separately (hack/kuberay/build.sh): kubectl apply --server-side -f <crds>/")
sys.stdout.write(yaml.safe_dump_all([sa, role, binding, deploy], sort_keys=False, explicit_start=True))
PY
