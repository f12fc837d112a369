"""Pure functions from observed children (Jobs, Pods, Deployments) to a custom resource's status."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from . import conditions as c
from .api.workload import PROGRESS_ANNOTATION, RESULT_ANNOTATION


def _job_condition(job: dict | None, type_: str) -> dict | None:
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def newest(pods: list[dict]) -> dict | None:
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


def annotation_json(pod: dict | None, key: str) -> dict | None:
    raw = (((pod or {}).get("metadata") or {}).get("annotations") or {}).get(key)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def termination(pod: dict | None) -> dict | None:
    for status in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return terminated
    return None


def result_of(pods: list[dict]) -> dict | None:
    """The workload's final report: its annotation, else a JSON termination message, from the newest pod that
    reported one."""
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True):
        found = annotation_json(pod, RESULT_ANNOTATION)
        if found:
            return found
        message = (termination(pod) or {}).get("message") or ""
        if message.strip().startswith("{"):
            try:
                return json.loads(message)
            except ValueError:
                pass
    return None


def failure_message(job: dict, pods: list[dict]) -> str:
    cond = _job_condition(job, "Failed") or {}
    parts = [cond.get("message") or cond.get("reason") or "the Job failed"]
    pod = newest([p for p in pods if (p.get("status") or {}).get("phase") == "Failed"] or pods)
    terminated = termination(pod)
    if terminated:
        detail = (terminated.get("message") or "").strip().splitlines()
        parts.append(f"exit code {terminated.get('exitCode')} ({terminated.get('reason') or 'Error'})"
                     + (f": {detail[-1][:300]}" if detail else ""))
    return "; ".join(parts)


def unschedulable(pods: list[dict]) -> str | None:
    for pod in pods:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return cond.get("message") or "no node fits the pod"
    return None


# What a user must do about a pod stuck before its container starts; these states do not end by themselves.
STUCK = {
    c.IMAGE_PULL_BACK_OFF: "check spec.image (or the chart's image settings) and that the node can pull it",
    c.ERR_IMAGE_PULL: "check spec.image (or the chart's image settings) and that the node can pull it",
    c.INVALID_IMAGE_NAME: "correct spec.image (or the chart's image settings)",
    c.CREATE_CONTAINER_CONFIG_ERROR: "a Secret or ConfigMap the pod reads is missing or lacks the key: create it or "
                                     "correct the spec field naming it (credentialsSecret, tokenSecret, configMap)",
    c.CREATE_CONTAINER_ERROR: "the container runtime refused the container: see the pod's events",
}


def stuck(pods: list[dict]) -> tuple[str, str] | None:
    """(reason, message) of the newest pod's container that waits on something it cannot get by itself."""
    pod = newest(pods)
    status = (pod or {}).get("status") or {}
    for container in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in STUCK:
            detail = (waiting.get("message") or "").strip()
            return reason, f"pod {pod['metadata']['name']}: {detail or reason}; {STUCK[reason]}"
    return None


def progress_text(progress: dict[str, Any] | None, done_key: str, total_key: str) -> str | None:
    if not progress or not progress.get(total_key):
        return None
    done, total = progress.get(done_key) or 0, progress[total_key]
    return f"{done}/{total} ({100 * done // max(total, 1)}%)"


def job_run(job: dict | None, pods: list[dict]) -> tuple[str, str, str]:
    """(phase, reason, message) of one workload run."""
    if job is None:
        return "Pending", c.PENDING, "creating the Job"
    failed = _job_condition(job, "Failed")
    if failed:
        reason = failed.get("reason") or c.JOB_FAILED
        if reason not in (c.BACKOFF_LIMIT_EXCEEDED, c.DEADLINE_EXCEEDED):
            reason = c.JOB_FAILED
        return "Failed", reason, failure_message(job, pods)
    if _job_condition(job, "Complete"):
        return "Succeeded", c.JOB_SUCCEEDED, "the Job completed"
    blocked = unschedulable(pods)
    if blocked:
        return "Pending", c.UNSCHEDULABLE, blocked
    waiting = stuck(pods)
    if waiting:
        return "Pending", waiting[0], waiting[1]
    if (job.get("status") or {}).get("active") and any(
            (p.get("status") or {}).get("phase") == "Running" for p in pods):
        return "Running", c.JOB_RUNNING, "the workload is running"
    return "Pending", c.JOB_CREATED, "waiting for the workload's pod to start"


# How long after its Job completed a run's report may still be on its way: the pod's annotation is written before
# the workload exits, but the operator sees pods and Jobs through separate watches, and a busy API server or a
# restarted operator delays either. A report missing after that long will not come: the run has failed.
RESULT_GRACE_SECONDS = 300.0


def seconds_since_completion(job: dict, now: datetime | None = None) -> float | None:
    """Seconds since the Job completed (its completionTime, else its Complete condition's transition)."""
    stamp = (job.get("status") or {}).get("completionTime") or (_job_condition(job, "Complete") or {}).get(
        "lastTransitionTime")
    if not stamp:
        return None
    try:
        completed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return ((now or datetime.now(timezone.utc)) - completed).total_seconds()


def awaiting_result(job: dict, now: datetime | None) -> bool:
    elapsed = seconds_since_completion(job, now)
    return elapsed is not None and elapsed < RESULT_GRACE_SECONDS


RESULT_MISSING_FIX = ("see the pod's log and termination message; the workload reports by annotating its pod, "
                      "which the ragtune-workload Role in the namespace must allow")


def finetune(job: dict | None, pods: list[dict], now: datetime | None = None) -> tuple[dict[str, Any], list[dict]]:
    phase, reason, message = job_run(job, pods)
    status: dict[str, Any] = {"phase": phase}
    if job is not None:
        status["jobName"] = job["metadata"]["name"]
        job_status = job.get("status") or {}
        if job_status.get("startTime"):
            status["startTime"] = job_status["startTime"]
        if job_status.get("completionTime"):
            status["completionTime"] = job_status["completionTime"]
    progress = annotation_json(newest(pods), PROGRESS_ANNOTATION)
    if progress:
        status["progress"] = progress
        status["progressText"] = progress_text(progress, "step", "totalSteps")
    conds = []
    if phase == "Succeeded":
        result = result_of(pods)
        if result and result.get("digest"):
            status["artifact"] = result
            status["progressText"] = "done"
            promotable = result.get("promotable", True)
            conds += [c.condition(c.READY, True, c.JOB_SUCCEEDED, f"adapter {result.get('uri')} "
                                  f"({result['digest'][:19]})"),
                      c.condition(c.SUCCEEDED, True, c.JOB_SUCCEEDED, "training finished"),
                      c.condition(c.PROMOTABLE, bool(promotable),
                                  c.EVALUATION_PASSED if promotable else c.EVALUATION_BELOW_THRESHOLD,
                                  _metrics_text(result.get("metrics") or {}))]
            conds.append(c.condition(c.PROGRESSING, False, c.JOB_SUCCEEDED, "finished"))
        elif awaiting_result(job, now):
            status["phase"] = "Running"
            message = "the Job completed; waiting for the workload's report"
            conds += [c.condition(c.READY, False, c.AWAITING_RESULT, message),
                      c.condition(c.PROGRESSING, True, c.AWAITING_RESULT, message)]
        else:  # nothing to serve, and waiting would not change that: a failure an endpoint can report
            status["phase"] = "Failed"
            message = "the Job completed but the workload reported no artifact; " + RESULT_MISSING_FIX
            conds += [c.condition(c.READY, False, c.RESULT_MISSING, message),
                      c.condition(c.SUCCEEDED, False, c.RESULT_MISSING, message),
                      c.condition(c.FAILED, True, c.RESULT_MISSING, message),
                      c.condition(c.PROGRESSING, False, c.RESULT_MISSING, message)]
    elif phase == "Failed":
        conds += [c.condition(c.READY, False, reason, message), c.condition(c.FAILED, True, reason, message),
                  c.condition(c.PROGRESSING, False, reason, message)]
    else:
        conds += [c.condition(c.READY, False, reason, message), c.condition(c.PROGRESSING, True, reason, message)]
    return status, conds


def _metrics_text(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in sorted(metrics.items()))


def vectorindex(job: dict | None, pods: list[dict], previous: dict[str, Any],
                now: datetime | None = None) -> tuple[dict[str, Any], list[dict]]:
    """`previous` is the current status: an active version from an earlier run keeps the index Ready while a new
    run builds, or when it fails (readers keep the old version)."""
    phase, reason, message = job_run(job, pods)
    status: dict[str, Any] = {"phase": phase}
    if job is not None:
        status["jobName"] = job["metadata"]["name"]
    progress = annotation_json(newest(pods), PROGRESS_ANNOTATION)
    if progress:
        status["progress"] = {k: v for k, v in progress.items() if k not in ("updatedAt", "phase", "waitingFor")}
        if progress.get("phase") == "Waiting":  # another run of this index holds the store
            status["progressText"] = f"waiting for {progress.get('waitingFor') or 'another index run'} to finish"
        else:
            status["progressText"] = progress_text(progress, "chunks", "chunksTotal") or progress_text(
                progress, "documents", "documentsTotal")
    has_active = bool(previous.get("activeVersion"))
    conds = []
    if phase == "Succeeded":
        result = result_of(pods)
        if result and result.get("activeVersion"):
            status.update({k: result[k] for k in ("documents", "chunks", "dimension", "embeddingModel",
                                                  "activeCollection", "activeVersion") if k in result})
            status["lastDurationSeconds"] = result.get("durationSeconds")
            status["lastRunTime"] = (job.get("status") or {}).get("completionTime")
            status["progressText"] = "done"
            status["progress"] = {k: result[k] for k in ("added", "kept", "removed", "embedded") if k in result}
            skipped = result.get("skipped") or []
            status["progress"]["skipped"] = result.get("skippedTotal") or len(skipped)
            status["skippedFiles"] = [{"path": str(f.get("path")), "reason": str(f.get("reason"))}
                                      for f in skipped[:20] if isinstance(f, dict)]
            conds += [c.condition(c.READY, True, c.JOB_SUCCEEDED, f"version {result['activeVersion']} active with "
                                  f"{result.get('chunks', '?')} chunks"),
                      c.condition(c.INDEXED, True, c.JOB_SUCCEEDED, f"{result.get('added', 0)} added, "
                                  f"{result.get('kept', 0)} kept, {result.get('removed', 0)} removed")]
            conds += [c.condition(c.PROGRESSING, False, c.JOB_SUCCEEDED, "finished"),
                      c.condition(c.FAILED, False, c.JOB_SUCCEEDED, "the last run succeeded")]
        elif awaiting_result(job, now):
            status["phase"] = "Running"
            message = "the Job completed; waiting for the workload's report"
            conds += [c.condition(c.READY, has_active, c.AWAITING_RESULT if not has_active else "Indexing",
                                  message if not has_active else "serving the previous version while indexing"),
                      c.condition(c.PROGRESSING, True, c.AWAITING_RESULT, message),
                      c.condition(c.FAILED, False, c.AWAITING_RESULT, message)]
        else:
            status["phase"] = "Failed"
            message = "the Job completed but the workload reported no index version; " + RESULT_MISSING_FIX
            conds += [c.condition(c.READY, has_active, c.RESULT_MISSING, message + (
                          "; readers keep the previous version" if has_active else "")),
                      c.condition(c.FAILED, True, c.RESULT_MISSING, message),
                      c.condition(c.PROGRESSING, False, c.RESULT_MISSING, message)]
    elif phase == "Failed":
        conds += [c.condition(c.READY, has_active, reason, message + (
                      "; readers keep the previous version" if has_active else "")),
                  c.condition(c.FAILED, True, reason, message),
                  c.condition(c.PROGRESSING, False, reason, message)]
    else:
        conds += [c.condition(c.READY, has_active, reason if not has_active else "Indexing",
                              message if not has_active else "serving the previous version while indexing"),
                  c.condition(c.PROGRESSING, True, reason, message),
                  c.condition(c.FAILED, False, reason, message)]
    return status, conds


def endpoint_workload(kind: str, child: dict | None, wanted: int) -> tuple[dict[str, Any], list[dict]]:
    """Status from the serving workload: a Deployment or a RayService."""
    if child is None:
        return {"phase": "Pending", "readyReplicas": 0}, [
            c.condition(c.READY, False, c.ROLLING_OUT, "creating the serving workload"),
            c.condition(c.AVAILABLE, False, c.ROLLING_OUT, "creating the serving workload"),
            c.condition(c.PROGRESSING, True, c.ROLLING_OUT, "creating the serving workload")]
    st = child.get("status") or {}
    if kind == "RayService":
        ok = c.is_true(st.get("conditions"), c.READY)
        ready = wanted if ok else 0
    else:
        ready = st.get("readyReplicas") or 0
        available = next((x for x in st.get("conditions") or [] if x.get("type") == "Available"), None)
        ok = bool(available and available.get("status") == "True") and ready >= min(wanted, 1)
        updated = st.get("updatedReplicas") or 0
        rolling = (st.get("observedGeneration") or 0) < (child["metadata"].get("generation") or 0) or \
            updated < wanted or (st.get("replicas") or 0) > wanted
    status = {"replicas": wanted, "readyReplicas": ready}
    if wanted == 0:
        status["phase"] = "Ready"
        return status, [c.condition(c.READY, True, c.SCALED_TO_ZERO, "scaled to zero replicas"),
                        c.condition(c.AVAILABLE, False, c.SCALED_TO_ZERO, "scaled to zero replicas"),
                        c.condition(c.PROGRESSING, False, c.SCALED_TO_ZERO, "scaled to zero replicas")]
    if ok:
        status["phase"] = "Ready"
        progressing = kind != "RayService" and rolling
        return status, [c.condition(c.READY, True, c.DEPLOYED, f"{ready}/{wanted} replicas ready"),
                        c.condition(c.AVAILABLE, True, c.DEPLOYED, f"{ready}/{wanted} replicas ready"),
                        c.condition(c.PROGRESSING, progressing, c.ROLLING_OUT if progressing else c.DEPLOYED,
                                    "rolling out a new version" if progressing else "rolled out")]
    status["phase"] = "Progressing"
    return status, [c.condition(c.READY, False, c.MINIMUM_REPLICAS_UNAVAILABLE, f"{ready}/{wanted} replicas ready"),
                    c.condition(c.AVAILABLE, False, c.MINIMUM_REPLICAS_UNAVAILABLE, f"{ready}/{wanted} ready"),
                    c.condition(c.PROGRESSING, True, c.ROLLING_OUT, "waiting for replicas")]
