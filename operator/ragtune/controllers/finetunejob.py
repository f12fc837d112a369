"""FineTuneJob: render the workload config and Job, then follow the Job to Succeeded or Failed."""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

from .. import GROUP, VERSION
from .. import conditions as c
from .. import statuses
from ..api.finetunejob import FineTuneJobSpec
from ..builders import finetune as builder
from . import shared

PLURAL = "finetunejobs"
KIND = "FineTuneJob"


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    try:
        return FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as exc:  # admission should have refused it; say what is wrong and stop retrying
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@shared.instrumented(KIND)
def reconcile(body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, **_: Any) -> None:
    parsed = parse_spec(spec)
    obj = dict(body)
    with shared.object_lock(PLURAL, namespace, name):
        shared.ensure_workload_identity(namespace)
        shared.apply_children(obj, builder.build(obj, parsed))
        refresh(obj)


def refresh(body: dict[str, Any]) -> None:
    """Recomputes status from the Job and its pods."""
    meta = body["metadata"]
    api = shared.api()
    job = api.get("batch/v1", "Job", builder.names(shared.common.owner_info(body))["job"], meta["namespace"])
    pods = api.list("v1", "Pod", meta["namespace"], {"job-name": job["metadata"]["name"]}) if job else []
    if job and job["metadata"].get("labels", {}).get(f"ragtune.io/{KIND.lower()}") != meta["name"]:
        job, pods = None, []
    fields, conds = statuses.finetune(job, pods)
    fields["progressText"] = fields.get("progressText") or {"Pending": "pending", "Running": "starting",
                                                            "Failed": "failed"}.get(fields["phase"], "")
    shared.write_status(PLURAL, body, fields, conds)


def refresh_owner(namespace: str, labels: dict[str, str] | None) -> None:
    name = shared.owner_of(labels, KIND)
    if not name:
        return
    owner = shared.api().get_custom(PLURAL, name, namespace)
    if owner is not None:
        with shared.object_lock(PLURAL, namespace, name):
            refresh(owner)


@kopf.on.event("batch", "v1", "jobs", labels={"ragtune.io/finetunejob": kopf.PRESENT})
def job_changed(namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    if type is not None:  # None: the initial listing; resume handlers cover it
        refresh_owner(namespace, labels)


@kopf.on.event("", "v1", "pods", labels={"ragtune.io/finetunejob": kopf.PRESENT})
def pod_changed(namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    if type is not None:
        refresh_owner(namespace, labels)


def status_is_ready(obj: dict[str, Any] | None) -> bool:
    return bool(obj) and c.is_true((obj.get("status") or {}).get("conditions"), c.READY)
