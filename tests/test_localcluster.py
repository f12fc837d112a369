"""Start-up failures of the local control plane are fast and say what to do."""

from __future__ import annotations

import socket

import pytest

import localcluster


def test_missing_binaries_are_named_with_the_fix(tmp_path):
    (tmp_path / "etcd").write_text("#!/bin/sh\n")
    (tmp_path / "etcd").chmod(0o755)
    with pytest.raises(localcluster.ClusterError) as err:
        localcluster.require_binaries(tmp_path)
    message = str(err.value)
    assert "kube-apiserver" in message and "etcd," not in message
    assert "hack/build-k8s.sh" in message


def test_a_taken_port_fails_fast_and_names_the_component(monkeypatch):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setattr(localcluster, "PORTS", localcluster.Ports(apiserver=port))
        with pytest.raises(localcluster.ClusterError) as err:
            localcluster.check_ports_free()
    assert f"apiserver:{port}" in str(err.value)
    assert "RAGTUNE_CLUSTER_PORT_BASE" in str(err.value)


def test_node_manifest_declares_one_cpu_and_one_gpu_node():
    import yaml
    nodes = yaml.safe_load(localcluster.node_manifest())["items"]
    capacity = {n["metadata"]["name"]: n["status"]["capacity"] for n in nodes}
    assert capacity["kwok-gpu-0"]["nvidia.com/gpu"] == "2"
    assert "nvidia.com/gpu" not in capacity["kwok-cpu-0"]
    assert all(n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake" for n in nodes)
