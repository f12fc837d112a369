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
