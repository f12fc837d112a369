"""High availability: two replicas with peering — one works, the other stands by and takes over when the first
one dies."""

from __future__ import annotations

import pytest
from operator_process import OperatorProcess
from ragtune_objects import bound_pvc, finetunejob


@pytest.fixture
def replicas(kube, crds, ragtune_operator, tmp_path):
    ragtune_operator.stop()  # the session's standalone operator would not take part in peering
    kube.apply({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "ragtune-ha-test"}})
    env = {"RAGTUNE_PEERING": "ragtune-ha-test", "RAGTUNE_PEERING_LIFETIME": "10"}
    leader = OperatorProcess(kube.kubeconfig, tmp_path, standalone=False, name="leader",
                             env={**env, "RAGTUNE_PEERING_PRIORITY": "200"})
    standby = OperatorProcess(kube.kubeconfig, tmp_path, standalone=False, name="standby",
                              env={**env, "RAGTUNE_PEERING_PRIORITY": "100"})
    leader.start()
    standby.start()
    yield leader, standby
    leader.stop()
    standby.stop()
    kube.kubectl("delete", "clusterkopfpeering", "ragtune-ha-test", "--wait=false")
    ragtune_operator.start()


def test_the_standby_pauses_and_takes_over_when_the_active_replica_dies(kube, namespace, replicas):
    leader, standby = replicas
    kube.wait_for(lambda: "Pausing operations in favour of" in standby.log_path.read_text(),
                  "the standby to pause in favour of the leader", timeout=30)
    bound_pvc(kube, namespace, "adapters")
    kube.apply(finetunejob("first"), namespace)
    kube.wait_for(lambda: kube.get("batch/v1", "Job", "first", namespace), "the leader to reconcile")

    leader.kill()  # no goodbye: its peering record has to expire
    kube.apply(finetunejob("second"), namespace)
    kube.wait_for(lambda: kube.get("batch/v1", "Job", "second", namespace), "the standby to take over", timeout=60)
    assert "Resuming operations after the pause" in standby.log_path.read_text()
