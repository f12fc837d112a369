"""Status patches replace the fields they change: a merge patch would otherwise keep keys the new value dropped."""

from ragtune.controllers.shared import replacing


def test_keys_the_new_value_lacks_are_nulled_and_lists_replaced():
    current = {"phase": "Running", "progress": {"documents": 3, "chunksTotal": 10, "added": 0},
               "served": {"adapter": "a", "meta": {"x": 1, "y": 2}}, "conditions": [{"type": "Ready"}]}
    changes = {"phase": "Succeeded", "progress": {"added": 1, "kept": 9},
               "served": {"adapter": "b", "meta": {"x": 1}}, "conditions": []}
    assert replacing(current, changes) == {
        "phase": "Succeeded",
        "progress": {"documents": None, "chunksTotal": None, "added": 1, "kept": 9},
        "served": {"adapter": "b", "meta": {"x": 1, "y": None}},
        "conditions": []}


def test_a_new_object_field_is_sent_as_is():
    assert replacing({}, {"progress": {"added": 1}}) == {"progress": {"added": 1}}


def test_a_deleted_object_leaves_nothing_in_the_caches():
    from ragtune.controllers import cache, shared

    body = {"apiVersion": "ragtune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "gone", "namespace": "ns", "uid": "u-1", "generation": 1}, "spec": {}}
    key, uid_key = ("FineTuneJob", "ns", "gone"), ("FineTuneJob", "ns", "u-1")
    shared.track_owner("FineTuneJob", body, "ns", "gone", "ADDED")
    cache.JOBS.put(key, "gone", {"metadata": {"name": "gone"}})
    cache.PODS.put(key, "gone-abc", {"metadata": {"name": "gone-abc"}})
    cache.STATUS.put(uid_key, 1, {"phase": "Running"})

    assert shared.track_owner("FineTuneJob", body, "ns", "gone", "DELETED") is True

    assert cache.OWNERS.get(key) is None and cache.JOBS.get(key) == [] and cache.PODS.get(key) == []
    assert cache.STATUS.get(uid_key) is None
