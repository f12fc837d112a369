"""Index runs on a Milvus server hold a Lease while they write, with the workloads' own ServiceAccount and Role
against the real API server: a second run waits, a dead holder's Lease expires, a run that lost it publishes
nothing."""

from __future__ import annotations

import json
import time
from urllib.parse import urlparse

import pytest
import yaml
from exclusive_runs import second_run_waits
from ragtune.builders.common import WORKLOAD_SERVICE_ACCOUNT, workload_rbac
from ragtune_workloads.index import store as store_module
from ragtune_workloads.index.store import ServerStore, StoreError, VersionInfo
from ragtune_workloads.lease import RunLease, lease_name


def pod_identity(kube, namespace: str, directory, monkeypatch, rbac: list[dict]) -> None:
    """This process as a workload pod of `namespace` sees the API: its ServiceAccount's token and the cluster CA
    where a pod has them, the API server's address in the environment."""
    for obj in rbac:
        kube.apply(obj, namespace)
    token = kube.kubectl("create", "token", WORKLOAD_SERVICE_ACCOUNT, "-n", namespace).stdout.strip()
    kubeconfig = yaml.safe_load(kube.kubeconfig.read_text())
    cluster = kubeconfig["clusters"][0]["cluster"]
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_bytes(open(cluster["certificate-authority"], "rb").read())
    server = urlparse(cluster["server"])
    monkeypatch.setenv("RAGTUNE_SERVICEACCOUNT_DIR", str(directory))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", server.hostname)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
    monkeypatch.setenv("POD_NAMESPACE", namespace)


@pytest.fixture
def as_workload(kube, namespace, tmp_path, monkeypatch):
    """A workload pod with the Role the operator gives workloads."""
    pod_identity(kube, namespace, tmp_path, monkeypatch, workload_rbac(namespace))
    return namespace


def holder(kube, namespace: str, name: str) -> str | None:
    lease = kube.get("coordination.k8s.io/v1", "Lease", name, namespace)
    return lease and lease["spec"].get("holderIdentity")


def test_a_second_run_waits_for_the_lease_and_a_dead_holders_lease_expires(kube, as_workload, monkeypatch):
    namespace = as_workload
    name = lease_name("ragtune-index", "docs_chat")
    first = RunLease(namespace, name, "index-run-a", duration=2.0)
    first.acquire(wait=5)
    assert holder(kube, namespace, name) == "index-run-a"

    second = RunLease(namespace, name, "index-run-b", duration=2.0)
    waits: list[str] = []
    with pytest.raises(TimeoutError, match="index-run-a has held Lease"):
        second.acquire(wait=3.0, on_wait=waits.append, poll=0.2)  # renewed all along: never expires
    assert waits and set(waits) == {"index-run-a"}

    first.release()
    assert kube.get("coordination.k8s.io/v1", "Lease", name, namespace) is None
    second.acquire(wait=5, poll=0.2)
    assert holder(kube, namespace, name) == "index-run-b"

    # The holder dies: nothing renews or deletes its Lease; a third run takes it after one unchanged duration.
    second._stop.set()
    second._renewer.join()
    third = RunLease(namespace, name, "index-run-c", duration=2.0)
    started = time.monotonic()
    third.acquire(wait=15, poll=0.2)
    assert 1.5 <= time.monotonic() - started < 10
    lease = kube.get("coordination.k8s.io/v1", "Lease", name, namespace)
    assert lease["spec"]["holderIdentity"] == "index-run-c" and lease["spec"]["leaseTransitions"] == 1
    third.release()


def test_server_store_runs_take_turns_and_a_run_that_lost_the_lease_publishes_nothing(kube, as_workload,
                                                                                       monkeypatch):
    namespace = as_workload
    monkeypatch.setattr(store_module, "LEASE_SECONDS", 3.0)
    monkeypatch.setenv("POD_NAME", "index-run-a")
    first = ServerStore(None, "docs_chat")  # exclusive() and the lost-Lease check need no Milvus
    second = ServerStore(None, "docs_chat")

    class AsPod:  # each run with its own pod name
        def __init__(self, store, pod):
            self.store, self.pod = store, pod

        def exclusive(self, **kwargs):
            monkeypatch.setenv("POD_NAME", self.pod)
            return self.store.exclusive(**kwargs)
    order, waits = second_run_waits(AsPod(first, "index-run-a"), AsPod(second, "index-run-b"), hold=3)
    assert order == ["first", "second"] and set(waits) == {"index-run-a"}

    # Another run took the Lease (this one could not renew in time): publishing refuses.
    monkeypatch.setenv("POD_NAME", "index-run-c")
    store = ServerStore(None, "docs_chat")
    with store.exclusive():
        name = lease_name("ragtune-index", "docs_chat")
        kube.kubectl("patch", "lease", name, "-n", namespace, "--type=merge", "-p",
                     json.dumps({"spec": {"holderIdentity": "index-run-d"}}))
        kube.wait_for(lambda: store.lease.lost_to, "the run to notice", timeout=10)
        info = VersionInfo(alias="docs_chat", version=2, embedding_model="m", dimension=4, metric="COSINE",
                           index_type="FLAT", chunks=1, documents=1, vectors_fingerprint="v",
                           layout_fingerprint="l")
        with pytest.raises(StoreError, match="index run index-run-d took over collection docs_chat .* nothing "
                                             "published"):
            store.publish(info)
    assert holder(kube, namespace, name) == "index-run-d", "release leaves another run's Lease alone"


def test_without_the_right_to_hold_leases_a_run_goes_ahead_and_says_what_to_grant(kube, namespace, tmp_path,
                                                                                  monkeypatch, caplog):
    """A Role from before Leases were granted (its operator not upgraded yet): runs go on as they did then."""
    pod_identity(kube, namespace, tmp_path, monkeypatch, [obj for obj in workload_rbac(namespace)
                                                          if obj["kind"] == "ServiceAccount"])
    monkeypatch.setenv("POD_NAME", "index-run-a")
    ran = False
    with caplog.at_level("WARNING"), ServerStore(None, "docs_chat").exclusive():
        ran = True
    assert ran
    assert "ragtune-workload" in caplog.text and "coordination.k8s.io leases" in caplog.text
