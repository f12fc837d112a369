"""Status is a pure function of what the Job and its pods show."""

from __future__ import annotations

import json

from ragtune import conditions, statuses


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


def test_an_index_run_waiting_for_another_run_says_whom_it_waits_for():
    waiting = pod(annotations={"ragtune.io/progress": json.dumps(
        {"phase": "Waiting", "waitingFor": "docs-7f3a-x2k", "documents": 0, "documentsTotal": 0})})
    fields, _ = statuses.vectorindex(job(active=1), [waiting], {"activeVersion": "v1"})
    assert fields["progressText"] == "waiting for docs-7f3a-x2k to finish"
    assert "waitingFor" not in fields["progress"]


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
    unschedulable = {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:01Z"},
                     "status": {"phase": "Pending", "conditions": [
                         {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                          "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
    _, waiting = statuses.vectorindex(job(active=1), [unschedulable], {})
    assert {c["type"]: c["reason"] for c in waiting}["Ready"] == "Unschedulable"
    merged = conditions.merge_conditions(waiting, conds, 1)
    assert {c["type"]: c["reason"] for c in merged} == {"Ready": "JobSucceeded", "Indexed": "JobSucceeded",
                                                        "Progressing": "JobSucceeded", "Failed": "JobSucceeded"}


def test_a_failed_reindex_keeps_the_previous_version_ready():
    failed = job(conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    _, conds = statuses.vectorindex(failed, [], {"activeVersion": "v1"})
    ready = next(c for c in conds if c["type"] == "Ready")
    assert ready["status"] == "True" and "readers keep the previous version" in ready["message"]


def waiting_pod(reason: str, message: str = "") -> dict:
    return {"metadata": {"name": "train-x", "creationTimestamp": "2026-01-01T00:00:01Z"},
            "status": {"phase": "Pending", "conditions": [],
                       "containerStatuses": [{"state": {"waiting": {"reason": reason, "message": message}}}]}}


def test_a_pod_that_cannot_start_by_itself_says_why_and_what_to_do():
    pulling = waiting_pod("ImagePullBackOff", 'Back-off pulling image "ragtune/finetune:typo"')
    fields, conds = statuses.finetune(job(active=1), [pulling])
    ready = next(c for c in conds if c["type"] == "Ready")
    assert fields["phase"] == "Pending" and ready["reason"] == "ImagePullBackOff"
    assert ready["message"] == ('pod train-x: Back-off pulling image "ragtune/finetune:typo"; check spec.image (or '
                                "the chart's image settings) and that the node can pull it")
    missing = waiting_pod("CreateContainerConfigError", 'secret "s3-creds" not found')
    _, conds = statuses.vectorindex(job(active=1), [missing], {})
    ready = next(c for c in conds if c["type"] == "Ready")
    assert ready["reason"] == "CreateContainerConfigError" and 'secret "s3-creds" not found' in ready["message"]
    assert "credentialsSecret" in ready["message"]
    # a pod merely being created is no news
    _, conds = statuses.finetune(job(active=1), [waiting_pod("ContainerCreating")])
    assert next(c for c in conds if c["type"] == "Ready")["reason"] == "JobCreated"


def test_a_run_that_reported_no_result_has_failed_and_an_index_keeps_its_readers():
    from datetime import datetime, timedelta, timezone

    done = job(conditions=[{"type": "Complete", "status": "True"}], completionTime="2026-01-01T00:01:00Z")
    completed = datetime(2026, 1, 1, 0, 1, tzinfo=timezone.utc)
    # the report may still be on its way for a while after the Job completed
    fields, conds = statuses.finetune(done, [pod("Succeeded")], now=completed + timedelta(seconds=5))
    assert fields["phase"] == "Running" and {c["type"]: c["reason"] for c in conds} == {
        "Ready": "AwaitingResult", "Progressing": "AwaitingResult"}
    fields, conds = statuses.finetune(done, [pod("Succeeded")], now=completed + timedelta(seconds=301))
    by_type = {c["type"]: c for c in conds}
    assert fields["phase"] == "Failed" and "artifact" not in fields
    assert by_type["Failed"]["status"] == "True" and by_type["Failed"]["reason"] == "ResultMissing"
    assert by_type["Ready"]["status"] == "False" and by_type["Succeeded"]["status"] == "False"
    assert "ragtune-workload Role" in by_type["Failed"]["message"]
    fields, _ = statuses.vectorindex(done, [pod("Succeeded")], {"activeVersion": "v1"}, now=completed)
    assert fields["phase"] == "Running"
    fields, conds = statuses.vectorindex(done, [pod("Succeeded")], {"activeVersion": "v1"},
                                         now=completed + timedelta(seconds=301))
    by_type = {c["type"]: c for c in conds}
    assert fields["phase"] == "Failed" and by_type["Failed"]["reason"] == "ResultMissing"
    assert by_type["Ready"]["status"] == "True" and "readers keep the previous version" in by_type["Ready"]["message"]


def test_an_endpoint_always_states_whether_it_is_progressing():
    for child, wanted in ((None, 1), ({"metadata": {"generation": 1}, "status": {}}, 0)):
        _, conds = statuses.endpoint_workload("Deployment", child, wanted)
        assert {c["type"] for c in conds} == {"Ready", "Available", "Progressing"}


def by_type(conds: list[dict]) -> dict[str, tuple[str, str]]:
    return {cond["type"]: (cond["status"], cond["reason"]) for cond in conds}


def test_a_run_past_its_deadline_fails_with_the_jobs_reason_and_an_unknown_reason_is_a_plain_failure():
    late = job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                            "message": "Job was active longer than specified deadline"}])
    fields, conds = statuses.finetune(late, [])
    assert fields["phase"] == "Failed"
    assert by_type(conds)["Ready"] == ("False", "DeadlineExceeded") and by_type(conds)["Failed"][1] == \
        "DeadlineExceeded"
    evicted = job(conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}])
    assert by_type(statuses.finetune(evicted, [])[1])["Failed"] == ("True", "JobFailed")


def test_a_finished_run_says_whether_its_adapter_met_the_evaluation_thresholds():
    done = job(conditions=[{"type": "Complete", "status": "True"}], completionTime="2026-01-01T00:01:00Z")

    def finished(promotable: bool) -> dict:
        result = {"uri": "pvc://adapters/a", "digest": "sha256:" + "5" * 64, "promotable": promotable,
                  "metrics": {"rougeL": 0.21, "evalLoss": 1.5}}
        conds = statuses.finetune(done, [pod("Succeeded", {"ragtune.io/result": json.dumps(result)})])[1]
        return next(cond for cond in conds if cond["type"] == "Promotable")

    passed, below = finished(True), finished(False)
    assert (passed["status"], passed["reason"]) == ("True", "EvaluationPassed")
    assert (below["status"], below["reason"]) == ("False", "EvaluationBelowThreshold")
    assert below["message"] == "evalLoss=1.5, rougeL=0.21"


def deployment(generation=1, observed=1, replicas=1, ready=1, updated=1, available=True) -> dict:
    return {"metadata": {"generation": generation},
            "status": {"observedGeneration": observed, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": updated,
                       "conditions": [{"type": "Available", "status": "True" if available else "False"}]}}


def test_an_endpoints_deployment_is_reported_as_it_rolls_out_and_when_replicas_are_missing():
    fields, conds = statuses.endpoint_workload("Deployment", deployment(), 1)
    assert fields["phase"] == "Ready" and by_type(conds)["Progressing"] == ("False", "Deployed")
    # a new template not yet observed, or old pods still there: Ready (the old version serves), rolling out
    for rolling in (deployment(generation=2, observed=1), deployment(replicas=2, ready=1, updated=1)):
        _, conds = statuses.endpoint_workload("Deployment", rolling, 1)
        assert by_type(conds)["Ready"] == ("True", "Deployed")
        assert by_type(conds)["Progressing"] == ("True", "RollingOut")
    fields, conds = statuses.endpoint_workload("Deployment", deployment(replicas=2, ready=0, available=False), 2)
    assert fields["phase"] == "Progressing" and fields["readyReplicas"] == 0
    assert by_type(conds)["Ready"] == ("False", "MinimumReplicasUnavailable")
    assert next(cond for cond in conds if cond["type"] == "Ready")["message"] == "0/2 replicas ready"
