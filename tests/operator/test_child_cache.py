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
    jobs.put(KEY, "ft-old", None)  # later events still apply
    assert [j["metadata"]["name"] for j in jobs.get(KEY)] == ["ft"]
