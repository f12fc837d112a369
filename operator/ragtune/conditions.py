"""Every condition type and reason ragtune sets, and the pure helpers that maintain a conditions list.

Conventions (Kubernetes API conventions): `Ready` is the one aggregate condition; reasons are CamelCase
constants; lastTransitionTime changes only when status changes; observedGeneration is stamped on each.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

# ---- condition types
READY = "Ready"
PROGRESSING = "Progressing"
SUCCEEDED = "Succeeded"      # FineTuneJob, VectorIndex: the last run finished
FAILED = "Failed"
PROMOTABLE = "Promotable"    # FineTuneJob: evaluation met the thresholds
INDEXED = "Indexed"          # VectorIndex: an active version can be queried
REFERENCES_READY = "ReferencesReady"  # HybridEndpoint: the FineTuneJob / VectorIndex it needs are Ready
AVAILABLE = "Available"      # HybridEndpoint: serving replicas are available
# kstatus' abnormal-true pair (Flux, kpt, Config Sync and cli-utils read these), derived from the ones above and
# present only while true
RECONCILING = "Reconciling"
STALLED = "Stalled"
KSTATUS = (RECONCILING, STALLED)

# ---- reasons
PENDING = "Pending"
JOB_CREATED = "JobCreated"
JOB_RUNNING = "JobRunning"
JOB_SUCCEEDED = "JobSucceeded"
JOB_FAILED = "JobFailed"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
UNSCHEDULABLE = "Unschedulable"
EVALUATION_PASSED = "EvaluationPassed"
EVALUATION_BELOW_THRESHOLD = "EvaluationBelowThreshold"
NOT_EVALUATED = "NotEvaluated"
SUSPENDED = "Suspended"
WAITING_FOR_FINE_TUNE_JOB = "WaitingForFineTuneJob"
WAITING_FOR_VECTOR_INDEX = "WaitingForVectorIndex"
REFERENCE_NOT_FOUND = "ReferenceNotFound"
REFERENCE_FAILED = "ReferenceFailed"
BASE_MODEL_MISMATCH = "BaseModelMismatch"
ADAPTER_NOT_PROMOTABLE = "AdapterNotPromotable"
REFERENCES_RESOLVED = "ReferencesResolved"
ROLLING_OUT = "RollingOut"
DEPLOYED = "Deployed"
MINIMUM_REPLICAS_UNAVAILABLE = "MinimumReplicasUnavailable"
SCALED_TO_ZERO = "ScaledToZero"
INVALID_SPEC = "InvalidSpec"
OWNERSHIP_CONFLICT = "OwnershipConflict"
RESULT_MISSING = "ResultMissing"
AWAITING_RESULT = "AwaitingResult"
# A pod that waits on something it cannot get by itself (its container's waiting reason, used as the condition's)
IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
ERR_IMAGE_PULL = "ErrImagePull"
INVALID_IMAGE_NAME = "InvalidImageName"
CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
CREATE_CONTAINER_ERROR = "CreateContainerError"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# metav1.Condition's limit on a message (the CRDs refuse a longer one, and with it the whole status write)
MESSAGE_LIMIT = 32768


def condition(type_: str, ok: bool | None, reason: str, message: str = "") -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    if len(message) > MESSAGE_LIMIT:
        message = message[:MESSAGE_LIMIT - 1] + "…"
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(current: list[dict[str, Any]] | None, desired: list[dict[str, Any]],
                     generation: int | None) -> list[dict[str, Any]]:
    """The conditions list after applying `desired`: transition times kept unless the status flips,
    conditions not mentioned kept as they are, stable order by type."""
    # every field metav1.Condition requires, also on a condition an older release wrote without them
    by_type = {c["type"]: {"message": "", "lastTransitionTime": now(), **c} for c in (current or [])}
    for new in desired:
        old = by_type.get(new["type"])
        merged = {**new, "observedGeneration": generation}
        if old and old.get("status") == new["status"]:
            merged["lastTransitionTime"] = old.get("lastTransitionTime") or now()
        else:
            merged["lastTransitionTime"] = now()
        by_type[new["type"]] = merged
    return [by_type[t] for t in sorted(by_type, key=_order)]


def with_kstatus(conditions: list[dict[str, Any]], generation: int | None) -> list[dict[str, Any]]:
    """`conditions` with kstatus' Reconciling or Stalled as they follow from Ready, Progressing and Failed: Stalled
    while a run failed or the object is neither Ready nor progressing (a missing reference, an invalid spec),
    Reconciling while it progresses, neither once it is Ready and settled. Without them kstatus counts an object
    as reconciled as soon as its observedGeneration is current, a FineTuneJob still training included."""
    ready = get(conditions, READY)
    abnormal = []
    if ready is not None:
        failed, progressing = get(conditions, FAILED), get(conditions, PROGRESSING)
        if is_true(conditions, FAILED):
            abnormal.append(condition(STALLED, True, failed["reason"], failed.get("message", "")))
        elif is_true(conditions, PROGRESSING):
            abnormal.append(condition(RECONCILING, True, progressing["reason"], progressing.get("message", "")))
        elif ready["status"] != "True":
            abnormal.append(condition(STALLED, True, ready["reason"], ready.get("message", "")))
    present = {x["type"] for x in abnormal}
    return [x for x in merge_conditions(conditions, abnormal, generation)
            if x["type"] not in KSTATUS or x["type"] in present]


def _order(type_: str) -> tuple[int, str]:
    return (0 if type_ == READY else 1, type_)


def get(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    found = get(conditions, type_)
    return bool(found and found.get("status") == "True")


def transitions(before: list[dict[str, Any]] | None, after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conditions whose status or reason changed: each becomes an event."""
    old = {c["type"]: (c.get("status"), c.get("reason")) for c in before or []}
    return [c for c in after if old.get(c["type"]) != (c["status"], c["reason"])]
