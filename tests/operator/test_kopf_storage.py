"""Where kopf keeps handler progress and the handled spec: a FineTuneJob's creation is marked by its status, so
handling a new one writes nothing to the object itself; other kinds keep kopf's annotations."""

from __future__ import annotations

import kopf

from ragtune.controllers.runtime import PREFIX, DiffBaseStorage, ProgressStorage

DIFFBASE_KEY = f"{PREFIX}/last-handled-configuration"


def body(kind: str, status: dict | None = None, annotations: dict | None = None) -> kopf.Body:
    return kopf.Body({"apiVersion": "ragtune.io/v1alpha1", "kind": kind,
                      "metadata": {"name": "x", "namespace": "ns", "generation": 1, "annotations": annotations or {}},
                      "spec": {"model": {"name": "base/tiny"}}, "status": status or {}})


def test_a_new_finetunejob_is_unhandled_until_ragtune_has_written_its_status():
    storage = DiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    assert storage.fetch(body=body("FineTuneJob")) is None  # kopf runs the create handler
    handled = body("FineTuneJob", status={"observedGeneration": 1, "phase": "Pending"})
    assert storage.fetch(body=handled) == storage.build(body=handled)  # no diff: nothing to run again


def test_handling_a_finetunejob_leaves_the_object_unpatched_and_other_kinds_patched():
    diffbase = DiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    progress = ProgressStorage(prefix=PREFIX)
    for kind, expect_patch in (("FineTuneJob", False), ("VectorIndex", True)):
        obj, patch = body(kind), kopf.Patch()
        progress.store(key="reconcile", record={"started": "t", "success": True}, body=obj, patch=patch)
        progress.purge(key="reconcile", body=obj, patch=patch)
        diffbase.store(body=obj, patch=patch, essence=diffbase.build(body=obj))
        assert bool(patch) is expect_patch, (kind, dict(patch))
    assert DIFFBASE_KEY in dict(patch)["metadata"]["annotations"]


def test_a_finetunejob_handler_that_will_retry_keeps_its_progress():
    progress = ProgressStorage(prefix=PREFIX)
    obj, patch = body("FineTuneJob"), kopf.Patch()
    progress.store(key="reconcile", record={"started": "t", "retries": 1, "delayed": "t2"}, body=obj, patch=patch)
    assert progress.fetch(key="reconcile", body=kopf.Body({**obj, "metadata": {
        **obj["metadata"], "annotations": dict(patch["metadata"]["annotations"])}}))["retries"] == 1


def test_an_annotation_from_an_earlier_version_still_counts():
    storage = DiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    old = body("FineTuneJob", annotations={DIFFBASE_KEY: '{"spec":{"model":{"name":"older"}}}'})
    assert storage.fetch(body=old) == {"spec": {"model": {"name": "older"}}}
