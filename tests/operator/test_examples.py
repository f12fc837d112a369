"""Every sample in examples/ is accepted by the API server as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_is_a_sample_of_each_kind_and_a_complete_stack():
    text = "\n".join(p.read_text() for p in EXAMPLES)
    for kind in ("FineTuneJob", "VectorIndex", "HybridEndpoint"):
        assert f"kind: {kind}" in text
    assert any(p.name == "hybrid-stack.yaml" for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_applies_cleanly(kube, crds, namespace, path):
    result = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode == 0, result.stderr
    assert "created (server dry run)" in result.stdout


KEDA = "github.com/kedacore/keda/v2@v2.18.0"


def test_the_keda_example_is_a_valid_scaled_object(kube, crds, namespace):
    """examples/keda/: a ScaledObject on a HybridEndpoint, checked against KEDA's own CRD (from its Go module)."""
    kube.install_module_crd(KEDA, "config/crd/bases/keda.sh_scaledobjects.yaml", "scaledobjects.keda.sh")
    try:
        example = EXAMPLES[0].parent / "keda" / "hybridendpoint-scaledobject.yaml"
        applied = kube.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False)
        assert applied.returncode == 0, applied.stderr
        # and what it scales is a kind with a scale subresource
        target = yaml.safe_load(example.read_text())["spec"]["scaleTargetRef"]
        scaled = kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", "hybridendpoints.ragtune.io")
        assert (target["apiVersion"], target["kind"]) == ("ragtune.io/v1alpha1", scaled["spec"]["names"]["kind"])
        assert "scale" in scaled["spec"]["versions"][0]["subresources"]
    finally:
        kube.remove_crd("scaledobjects.keda.sh")
