"""Shared fixtures: the local control plane is started once per test session (or an already running one is
reused), and only what this session started is stopped at the end; so is the S3 server, built on first use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import localcluster  # noqa: E402
import s3server  # noqa: E402
from kube import Kube  # noqa: E402
from operator_process import OperatorProcess  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    """The kubeconfig path of a running local control plane."""
    started_here = not localcluster.is_up()
    try:
        kubeconfig = localcluster.up(quiet=False)
    except localcluster.ClusterError as exc:
        pytest.fail(f"the local control plane did not start: {exc}", pytrace=False)
    yield kubeconfig
    if started_here and not os.environ.get("RAGTUNE_KEEP_CLUSTER"):
        localcluster.down(quiet=True)


@pytest.fixture(scope="session")
def kube(cluster) -> Kube:
    return Kube(cluster, localcluster.binaries_dir() / "kubectl")


@pytest.fixture(scope="session")
def crds(kube: Kube):
    """ragtune's CRDs, installed from crds/ as users install them."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    for crd in ("finetunejobs", "vectorindexes", "hybridendpoints"):
        kube.wait_condition("apiextensions.k8s.io/v1", "CustomResourceDefinition", f"{crd}.ragtune.io", None,
                            "Established")
    return ROOT / "crds"


@pytest.fixture(scope="session")
def ragtune_operator(kube: Kube, crds, tmp_path_factory):
    """One operator process for the session; tests that kill it restart it before they end."""
    operator = OperatorProcess(kube.kubeconfig, tmp_path_factory.mktemp("operator"))
    operator.start()
    OPERATORS.append(operator)
    yield operator
    OPERATORS.remove(operator)
    operator.stop()


# The session's operator, for the failure report of a test that ran beside it, and where its log stood when
# each test began.
OPERATORS: list[OperatorProcess] = []
LOG_START = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Remembers where the operator's log stood when the test began."""
    item.stash[LOG_START] = [(op, op.starts, op.log_size()) for op in OPERATORS]
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries what the operator logged while it ran: a controller test that times out
    waiting for a status says little without it."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for operator, starts, offset in item.stash.get(LOG_START, []):
        text = operator.log_since(offset if operator.starts == starts else 0)
        report.sections.append((f"operator log during the test ({operator.log_path.name})", text))


@pytest.fixture
def namespace(kube: Kube):
    name = kube.create_namespace()
    yield name
    kube.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> s3server.S3Server:
    """hack/s3server on a free loopback port for the session. Where it cannot be built (no Go, no module proxy)
    the tests that need it are skipped, except in CI, where that is a failure."""
    try:
        server = s3server.S3Server(s3server.build(), tmp_path_factory.mktemp("s3server") / "server.log")
        server.start()
    except s3server.S3ServerError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the S3 server is needed in CI: {exc}", pytrace=False)
        pytest.skip(f"no S3 server: {exc}")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> s3server.S3Server:
    """The S3 server, with the environment a workload pod gets from a location's credentialsSecret and nothing
    else of AWS's from the machine running the tests."""
    for name in ("AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3server.ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3server.SECRET_KEY)
    return s3_server


def pytest_collection_modifyitems(items):
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
