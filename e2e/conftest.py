"""The kind cluster for the e2e tests: started (or reused) once per session, with ragtune's images loaded and the
chart installed. A cluster this session created is deleted at the end unless RAGTUNE_KEEP_CLUSTER is set; the
Docker engine and the cached images stay for the next run (`make kind-down` removes everything)."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack  # noqa: E402


def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(here):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def kind():
    """A Kind handle on a cluster running ragtune's chart. Fails (never skips) when Docker or kind cannot start."""
    existed = stack.cluster_exists()
    try:
        kubeconfig = stack.cluster_up()
        kind = stack.Kind(kubeconfig)
        stack.images()
        stack.remove_stale_namespaces(kind)   # first: their pods would hold the capacity the operator needs
        stack.install_chart(kind, stack.project_version())
        stack.stage_data()
    except Exception as exc:  # noqa: BLE001 — reported as the e2e's failure, with the cause
        pytest.fail(f"the kind cluster could not be prepared: {exc}", pytrace=False)
    yield kind
    if not existed and not os.environ.get("RAGTUNE_KEEP_CLUSTER"):
        stack.cluster_delete()


@pytest.fixture(scope="module")
def namespace(kind):
    name = f"e2e-{secrets.token_hex(3)}"
    kind.apply({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {stack.E2E_LABEL: "true"}}})
    kind.apply(stack.volumes(name))
    yield name
    kind.kubectl("delete", "namespace", name, "--wait=false", check=False)
    kind.kubectl("delete", "pv", "-l", f"ragtune.io/e2e-namespace={name}", "--wait=false", check=False)
