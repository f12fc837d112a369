"""Every sample in examples/ is accepted by the API server as written."""

from __future__ import annotations

from pathlib import Path

import pytest

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
