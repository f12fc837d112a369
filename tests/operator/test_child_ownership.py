"""Whose objects the operator writes and deletes: only its own. An object of somebody else's that holds a child's
name is neither taken over nor deleted (the owner says why and what to do), and ownership follows the deletion
policy and an owner made again."""

from __future__ import annotations

import pytest
from ragtune_objects import API, endpoint, ready_references, vectorindex, wait_ready

from ragtune.controllers import shared
from ragtune.kube import FIELD_MANAGER, foreign_holder, owner_references_patch

OWNER = {"apiVersion": API, "kind": "VectorIndex", "name": "docs", "uid": "u-2", "controller": True,
         "blockOwnerDeletion": True}
LABELS = {"app.kubernetes.io/managed-by": "ragtune", "ragtune.io/vectorindex": "docs", "app.kubernetes.io/name": "x"}


def child(owner: dict | None = OWNER, labels: dict | None = None, others: tuple = ()) -> dict:
    refs = [*others, *([owner] if owner else [])]
    return {"kind": "ConfigMap", "metadata": {"name": "docs-config", "labels": LABELS if labels is None else labels,
                                              **({"ownerReferences": refs} if refs else {})}}


def test_only_ragtunes_own_objects_count_as_its_children():
    desired = child()
    assert foreign_holder(desired, child()) is None
    # an earlier VectorIndex of the same name (deleted and made again) or none at all, with ragtune's labels
    assert foreign_holder(desired, child(owner={**OWNER, "uid": "u-1"})) is None
    assert foreign_holder(desired, child(owner=None)) is None
    assert foreign_holder(child(owner=None), child()) is None  # a kept volume whose owner held it until now
    assert "no owner" in foreign_holder(desired, child(owner=None, labels={}))
    assert "no owner" in foreign_holder(desired, child(owner=None, labels={**LABELS, "ragtune.io/vectorindex": "b"}))
    held = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d-1", "controller": True}
    assert foreign_holder(desired, child(owner=held)) == "is controlled by Deployment web"
    other_index = {**OWNER, "name": "other", "uid": "u-9"}
    assert foreign_holder(desired, child(owner=other_index)) == "is controlled by VectorIndex other"


def test_drift_is_somebody_elses_change_to_a_childs_spec_or_to_ragtunes_own_labels():
    def seen(event: str | None, generation: int, labels: dict, writer: str, second: int) -> bool:
        meta = {"namespace": "ns", "name": "drift-web", "generation": generation, "labels": labels,
                "managedFields": [{"manager": writer, "operation": "Update",
                                   "time": f"2026-12-07T19:00:{second:02d}Z"}]}
        return shared.drifted("Deployment", {"metadata": meta}, event)

    own = {"app.kubernetes.io/name": "serve", "ragtune.io/hybridendpoint": "drift-web"}
    assert not seen(None, 1, own, FIELD_MANAGER, 1)  # listed when the watch starts
    assert not seen("MODIFIED", 1, {**own, "team": "a"}, "kubectl-label", 2)  # somebody else's label added
    assert seen("MODIFIED", 1, {"ragtune.io/hybridendpoint": "drift-web", "team": "a"}, "kubectl-label", 3)
    assert not seen("MODIFIED", 1, {**own, "team": "a"}, FIELD_MANAGER, 4)  # put back by ragtune
    assert not seen("MODIFIED", 1, {**own, "team": "a"}, "kubectl-label", 4)  # nothing of ragtune's changed
    assert seen("MODIFIED", 2, {**own, "team": "a"}, "kubectl-edit", 5)  # a new spec
    assert not seen("MODIFIED", 3, own, FIELD_MANAGER, 6)  # ragtune's own
    assert seen("DELETED", 3, own, FIELD_MANAGER, 6)


def test_a_changed_controller_is_replaced_and_other_references_stay():
    plain = {"apiVersion": "v1", "kind": "ConfigMap", "name": "extra", "uid": "c-1"}
    assert owner_references_patch(child(), child(others=(plain,))) is None
    assert owner_references_patch(child(), child(owner={**OWNER, "uid": "u-1"}, others=(plain,))) == [plain, OWNER]
    assert owner_references_patch(child(owner=None), child(others=(plain,))) == [plain]
    assert owner_references_patch(child(), child(owner=None)) == [OWNER]


def conflict(kube, namespace: str, name: str, kind: str = "VectorIndex") -> dict | None:
    obj = kube.get(API, kind, name, namespace) or {}
    ready = kube.condition(obj, "Ready") if obj.get("status") else None
    return ready if ready and ready["reason"] == "OwnershipConflict" else None


@pytest.mark.usefixtures("ragtune_operator")
def test_somebody_elses_object_under_a_childs_name_is_left_alone_until_it_goes(kube, namespace):
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "docs-config", "labels": {"team": "a"}},
              "data": {"owner": "another team"}}
    kube.apply(theirs, namespace)
    kube.apply(vectorindex("docs"), namespace)
    ready = kube.wait_for(lambda: conflict(kube, namespace, "docs"), "the conflict on the VectorIndex")
    assert ready["status"] == "False"
    assert f"ConfigMap {namespace}/docs-config already exists and is not ragtune's" in ready["message"]
    assert "Delete or rename that ConfigMap, or give this object another name" in ready["message"]
    obj = kube.get(API, "VectorIndex", "docs", namespace)
    assert kube.condition(obj, "Stalled")["reason"] == "OwnershipConflict"
    assert any(e["reason"] == "OwnershipConflict" and e["type"] == "Warning" for e in kube.events(namespace, "docs"))
    left = kube.get("v1", "ConfigMap", "docs-config", namespace)
    assert left["data"] == {"owner": "another team"} and left["metadata"]["labels"] == {"team": "a"}
    assert "ownerReferences" not in left["metadata"]
    assert not kube.list("batch/v1", "Job", namespace, label_selector="ragtune.io/vectorindex=docs")

    kube.kubectl("delete", "-n", namespace, "configmap", "docs-config")
    kube.wait_for(lambda: kube.list("batch/v1", "Job", namespace, label_selector="ragtune.io/vectorindex=docs"),
                  "the indexing Job once the name is free", timeout=90)
    kube.wait_for(lambda: not conflict(kube, namespace, "docs"), "the conflict to clear")
    mine = kube.get("v1", "ConfigMap", "docs-config", namespace)
    assert mine["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]


@pytest.mark.usefixtures("ragtune_operator")
def test_a_child_it_no_longer_wants_is_deleted_only_if_it_is_its_own(kube, namespace):
    # A CronJob of somebody else's named like an index's refresh schedule: the index has no schedule, and a
    # CronJob under that name is not its to delete.
    theirs = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly-refresh"},
              "spec": {"schedule": "0 1 * * *", "jobTemplate": {"spec": {"template": {"spec": {
                  "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}}}
    kube.apply(theirs, namespace)
    kube.apply(vectorindex("other", schedule="0 3 * * *"), namespace)
    kube.wait_for(lambda: kube.get("batch/v1", "CronJob", "other-refresh", namespace), "the index's own CronJob")
    kube.apply(vectorindex("nightly"), namespace)
    kube.wait_for(lambda: kube.list("batch/v1", "Job", namespace, label_selector="ragtune.io/vectorindex=nightly"),
                  "the indexing Job")
    kube.apply(vectorindex("other"), namespace)  # its schedule removed: its CronJob goes
    kube.wait_gone("batch/v1", "CronJob", "other-refresh", namespace)
    assert kube.get("batch/v1", "CronJob", "nightly-refresh", namespace)["spec"]["schedule"] == "0 1 * * *"


@pytest.mark.usefixtures("ragtune_operator")
def test_the_store_follows_the_deletion_policy_when_it_changes(kube, namespace):
    kube.apply(vectorindex("docs", deletionPolicy="Delete"), namespace)
    owned = kube.wait_for(lambda: (kube.get("v1", "PersistentVolumeClaim", "docs-store", namespace) or {})
                          .get("metadata", {}).get("ownerReferences"), "the store owned by its index")
    assert owned[0]["kind"] == "VectorIndex"
    kube.apply(vectorindex("docs", deletionPolicy="Retain"), namespace)
    kube.wait_for(lambda: "ownerReferences" not in kube.get("v1", "PersistentVolumeClaim", "docs-store",
                                                            namespace)["metadata"], "the store to be let go")
    kube.kubectl("delete", "-n", namespace, "vix", "docs")
    kube.wait_gone(API, "VectorIndex", "docs", namespace)
    kube.wait_for(lambda: not kube.list("batch/v1", "Job", namespace, label_selector="ragtune.io/vectorindex"),
                  "the indexing Jobs to be garbage-collected")
    assert kube.get("v1", "PersistentVolumeClaim", "docs-store", namespace) is not None, "Retain keeps the data"


@pytest.mark.usefixtures("ragtune_operator")
def test_an_index_made_again_takes_over_the_children_its_predecessor_left(kube, namespace):
    kube.apply(vectorindex("docs"), namespace)
    first = kube.wait_for(lambda: kube.get("v1", "ConfigMap", "docs-config", namespace), "the config")
    before = first["metadata"]["ownerReferences"][0]["uid"]
    kube.kubectl("delete", "-n", namespace, "vix", "docs", "--cascade=orphan")
    kube.wait_gone(API, "VectorIndex", "docs", namespace)
    kube.apply(vectorindex("docs"), namespace)
    uid = kube.wait_for(lambda: (kube.get(API, "VectorIndex", "docs", namespace) or {}).get("metadata", {})
                        .get("uid"), "the new index")
    assert uid != before
    kube.wait_for(lambda: [ref["uid"] for ref in kube.get("v1", "ConfigMap", "docs-config", namespace)["metadata"]
                           .get("ownerReferences", [])] == [uid], "the config owned by the new index")
    assert not conflict(kube, namespace, "docs")


@pytest.mark.usefixtures("ragtune_operator")
def test_an_endpoint_named_like_an_existing_service_leaves_that_service_as_it_is(kube, namespace):
    """An app team's Service `web` and PodDisruptionBudget `web` before a HybridEndpoint `web`: neither is taken
    over or deleted. The endpoint serves once the Service is out of the way; the budget (an endpoint of one replica
    wants none of its own) stays."""
    ready_references(kube, namespace, "ft", "sha256:" + "1" * 64)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    budget = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web"},
              "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}}
    kube.apply([service, budget], namespace)
    kube.apply(endpoint("web", adapter="ft", index="docs"), namespace)
    ready = kube.wait_for(lambda: conflict(kube, namespace, "web", "HybridEndpoint"), "the conflict on the endpoint",
                          timeout=90)
    assert f"Service {namespace}/web already exists and is not ragtune's" in ready["message"]
    assert kube.get(API, "HybridEndpoint", "web", namespace)["status"]["phase"] == "Pending"
    left = kube.get("v1", "Service", "web", namespace)
    assert left["spec"]["selector"] == {"app": "web"} and left["spec"]["ports"][0]["targetPort"] == 8080
    assert "ownerReferences" not in left["metadata"]

    kube.kubectl("delete", "-n", namespace, "service", "web")
    wait_ready(kube, "HybridEndpoint", "web", namespace, reason="Deployed", timeout=90)
    assert kube.get("v1", "Service", "web", namespace)["metadata"]["ownerReferences"][0]["kind"] == "HybridEndpoint"
    kept = kube.get("policy/v1", "PodDisruptionBudget", "web", namespace)
    assert kept is not None and kept["spec"]["minAvailable"] == 1 and "ownerReferences" not in kept["metadata"]


@pytest.mark.usefixtures("ragtune_operator")
def test_an_endpoints_children_changed_or_deleted_by_hand_are_put_back(kube, namespace):
    ready_references(kube, namespace, "ft", "sha256:" + "1" * 64)
    kube.apply(endpoint("chat", adapter="ft", index="docs"), namespace)
    wait_ready(kube, "HybridEndpoint", "chat", namespace, reason="Deployed", timeout=90)
    deployment = kube.get("apps/v1", "Deployment", "chat", namespace)
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    service = kube.get("v1", "Service", "chat", namespace)

    kube.kubectl("set", "image", "-n", namespace, "deployment/chat", "serve=example.com/other:1")
    kube.wait_for(lambda: kube.get("apps/v1", "Deployment", "chat", namespace)["spec"]["template"]["spec"][
        "containers"][0]["image"] == image, "the Deployment's image to be put back")
    kube.kubectl("delete", "-n", namespace, "service", "chat")
    back = kube.wait_for(lambda: kube.get("v1", "Service", "chat", namespace), "the Service to be made again")
    assert back["metadata"]["uid"] != service["metadata"]["uid"]
    assert back["spec"]["selector"] == service["spec"]["selector"]
    config = kube.get("v1", "ConfigMap", "chat-config", namespace)
    kube.kubectl("patch", "-n", namespace, "configmap", "chat-config", "--type=merge", "-p",
                 '{"data": {"config.json": "{}"}}')
    kube.wait_for(lambda: kube.get("v1", "ConfigMap", "chat-config", namespace)["data"] == config["data"],
                  "the endpoint's config to be put back")
    # Labels changed by hand change no generation; ragtune's own come back, somebody else's added one stays.
    own = {key: deployment["metadata"]["labels"][key]
           for key in ("app.kubernetes.io/part-of", "app.kubernetes.io/name")}
    kube.kubectl("label", "-n", namespace, "deployment/chat", "--overwrite", "app.kubernetes.io/part-of-",
                 "app.kubernetes.io/name=renamed", "team=search")
    labels = kube.wait_for(lambda: (lambda found: found if all(found.get(k) == v for k, v in own.items()) else None)(
        kube.get("apps/v1", "Deployment", "chat", namespace)["metadata"]["labels"]), "the Deployment's labels back")
    assert labels["team"] == "search"
    assert kube.get("apps/v1", "Deployment", "chat", namespace)["metadata"]["uid"] == deployment["metadata"]["uid"]


@pytest.mark.usefixtures("ragtune_operator")
def test_an_indexs_refresh_schedule_changed_or_deleted_by_hand_is_put_back(kube, namespace):
    kube.apply(vectorindex("nightly", schedule="0 3 * * *"), namespace)
    first = kube.wait_for(lambda: kube.get("batch/v1", "CronJob", "nightly-refresh", namespace), "the CronJob")
    kube.kubectl("patch", "-n", namespace, "cronjob", "nightly-refresh", "--type=merge", "-p",
                 '{"spec": {"schedule": "* * * * *"}}')
    kube.wait_for(lambda: kube.get("batch/v1", "CronJob", "nightly-refresh", namespace)["spec"]["schedule"]
                  == "0 3 * * *", "the schedule to be put back")
    kube.kubectl("delete", "-n", namespace, "cronjob", "nightly-refresh")
    again = kube.wait_for(lambda: (lambda cron: cron if cron and cron["metadata"]["uid"] != first["metadata"]["uid"]
                                   else None)(kube.get("batch/v1", "CronJob", "nightly-refresh", namespace)),
                          "the CronJob to be made again")
    assert again["spec"]["schedule"] == "0 3 * * *"
    jobs = kube.list("batch/v1", "Job", namespace, label_selector="ragtune.io/vectorindex=nightly")
    assert len(jobs) == 1, "putting the schedule back starts no indexing run"


@pytest.mark.usefixtures("ragtune_operator")
def test_a_service_account_of_somebody_elses_under_the_workloads_name_is_reported(kube, namespace):
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ragtune-workload"}}, namespace)
    kube.apply(vectorindex("docs"), namespace)
    ready = kube.wait_for(lambda: conflict(kube, namespace, "docs"), "the conflict on the VectorIndex")
    assert f"ServiceAccount {namespace}/ragtune-workload already exists and is not ragtune's" in ready["message"]
    assert not kube.list("batch/v1", "Job", namespace, label_selector="ragtune.io/vectorindex=docs")
    # made ragtune's on purpose (labelled as ragtune labels its own): used from then on
    kube.kubectl("label", "-n", namespace, "serviceaccount", "ragtune-workload", "app.kubernetes.io/managed-by=ragtune")
    kube.wait_for(lambda: kube.list("batch/v1", "Job", namespace, label_selector="ragtune.io/vectorindex=docs"),
                  "the indexing Job", timeout=90)
    assert kube.get("rbac.authorization.k8s.io/v1", "RoleBinding", "ragtune-workload", namespace) is not None
