"""The operator's child caches: what a read from the API adds never overwrites what the watch recorded."""

from __future__ import annotations

from ragtune.controllers.cache import ChildCache

KEY = ("FineTuneJob", "ns", "ft")


def test_a_read_from_the_api_never_overwrites_a_newer_watch_event():
    jobs = ChildCache()
    # The resume handler read the Job while it ran; the watch delivered its completion in between.
    jobs.put(KEY, "ft", {"metadata": {"name": "ft"}, "status": {"succeeded": 1}})
    jobs.fill(KEY, {"ft": {"metadata": {"name": "ft"}, "status": {"active": 1}},
                    "ft-old": {"metadata": {"name": "ft-old"}, "status": {}}})
    assert {j["metadata"]["name"]: j["status"] for j in jobs.get(KEY)} == {"ft": {"succeeded": 1}, "ft-old": {}}
    jobs.delete(KEY, "ft-old", None)  # later events still apply
    assert [j["metadata"]["name"] for j in jobs.get(KEY)] == ["ft"]


def test_a_read_from_the_api_never_brings_back_a_child_the_watch_saw_deleted():
    pods = ChildCache()
    # The resume handler listed the pods; the watch delivered one's deletion before the listing was recorded.
    pods.put(KEY, "ft-a", {"metadata": {"name": "ft-a", "uid": "u-a"}, "status": {"phase": "Running"}})
    pods.delete(KEY, "ft-a", "u-a")
    pods.fill(KEY, {"ft-a": {"metadata": {"name": "ft-a", "uid": "u-a"}, "status": {"phase": "Running"}},
                    "ft-b": {"metadata": {"name": "ft-b", "uid": "u-b"}, "status": {"phase": "Pending"}}})
    assert [p["metadata"]["name"] for p in pods.get(KEY)] == ["ft-b"]
    # A new child under the old name is another object (another uid): it is recorded.
    pods.fill(KEY, {"ft-a": {"metadata": {"name": "ft-a", "uid": "u-a2"}, "status": {"phase": "Pending"}}})
    assert sorted(p["metadata"]["uid"] for p in pods.get(KEY)) == ["u-a2", "u-b"]
    pods.forget(KEY)
    assert pods.get(KEY) == []
