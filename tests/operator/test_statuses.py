"""Status is a pure function of what the Job and its pods show."""

from __future__ import annotations

import json

from ragtune import statuses


def job(name="j", **status) -> dict:
    return {"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": status}


def pod(phase="Running", annotations=None, terminated=None) -> dict:
    state = {"terminated": terminated} if terminated else {"running": {}}
    return {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:01Z", "annotations": annotations or {}},
            "status": {"phase": phase, "conditions": [], "containerStatuses": [{"state": state}]}}


def test_a_failed_job_reports_its_reason_exit_code_and_last_log_line():
    failed = job(conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                              "message": "Job has reached the specified backoff limit"}])
    broken = pod("Failed", terminated={"exitCode": 3, "reason": "Error",
                                       "message": "loading rows\ntrain.jsonl line 7: missing field \"output\""})
    fields, conds = statuses.finetune(failed, [broken])
    ready = next(c for c in conds if c["type"] == "Ready")
    assert fields["phase"] == "Failed" and ready["reason"] == "BackoffLimitExceeded"
    assert 'exit code 3 (Error): train.jsonl line 7: missing field "output"' in ready["message"]


def test_progress_annotation_becomes_status_and_a_progress_column():
    running = job(active=1)
    reporting = pod(annotations={"ragtune.io/progress": json.dumps({"step": 30, "totalSteps": 120, "loss": 0.9})})
    fields, conds = statuses.finetune(running, [reporting])
    assert fields["progress"]["step"] == 30 and fields["progressText"] == "30/120 (25%)"
    assert next(c for c in conds if c["type"] == "Ready")["reason"] == "JobRunning"


def test_a_finished_index_run_reports_counts_and_skipped_files():
    done = job(conditions=[{"type": "Complete", "status": "True"}], completionTime="2026-01-01T00:01:00Z")
    result = {"documents": 3, "chunks": 9, "dimension": 384, "activeVersion": "v2", "activeCollection": "d_v2",
              "added": 2, "kept": 7, "removed": 1, "embedded": 2, "durationSeconds": 4.2,
              "skipped": [{"path": "bad.pdf", "reason": "not a PDF"}], "skippedTotal": 1}
    fields, conds = statuses.vectorindex(done, [pod("Succeeded", {"ragtune.io/result": json.dumps(result)})], {})
    assert fields["activeVersion"] == "v2" and fields["progress"] == {"added": 2, "kept": 7, "removed": 1,
                                                                      "embedded": 2, "skipped": 1}
    assert fields["skippedFiles"] == [{"path": "bad.pdf", "reason": "not a PDF"}]
    assert next(c for c in conds if c["type"] == "Ready")["status"] == "True"
    # a run that was unschedulable for a while and then succeeded leaves no stale reason behind
    assert next(c for c in conds if c["type"] == "Failed")["reason"] == "JobSucceeded"


def test_a_failed_reindex_keeps_the_previous_version_ready():
    failed = job(conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    _, conds = statuses.vectorindex(failed, [], {"activeVersion": "v1"})
    ready = next(c for c in conds if c["type"] == "Ready")
    assert ready["status"] == "True" and "readers keep the previous version" in ready["message"]
