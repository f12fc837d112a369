"""FineTuneJob: render the workload config and Job, then follow the Job to Succeeded or Failed."""

from __future__ import annotations

from typing import Any

import kopf

from .. import GROUP, VERSION
from .. import statuses
from ..api.finetunejob import FineTuneJobSpec
from ..builders import finetune as builder
from . import cache, shared

PLURAL = "finetunejobs"
KIND = "FineTuneJob"
FINISHED = ("Succeeded", "Failed")  # phases after which the run's Job is never made again


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    return shared.parse_spec(FineTuneJobSpec, spec)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@shared.instrumented(KIND)
def reconcile(body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, reason: str, **_: Any) -> None:
    parsed = parse_spec(spec)
    key, obj = shared.remember_owner(KIND, body, namespace, name)
    children = builder.build(obj, parsed)
    with shared.object_lock(*key):
        if reason == "resume" and shared.known_status(body).get("phase") in FINISHED and \
                shared.api().get("batch/v1", "Job", name, namespace) is None:
            # Its Job was deleted after it finished (by hand, or by a cleanup policy): the result stands, and
            # creating the Job again would train a second time into the same output.
            return
        shared.ensure_workload_identity(namespace, obj)
        outcome = shared.apply_children(obj, children)
        job_existed = outcome.get(f"Job/{name}") != "created"
        if reason == "resume" or job_existed:
            # After a restart the caches are cold — also when the operator died between creating the Job and
            # recording that it handled the creation, so kopf runs the create handler again over a Job that may
            # already have finished: read the Job and its pods once from the API.
            job = shared.api().get("batch/v1", "Job", name, namespace)
            pods = shared.api().list("v1", "Pod", namespace, {"job-name": name}) if job else []
            cache.JOBS.fill(key, {name: cache.compact_job(job)} if job else {})
            cache.PODS.fill(key, {p["metadata"]["name"]: cache.compact_pod(p) for p in pods})
        elif not cache.JOBS.get(key):
            cache.JOBS.put(key, name, cache.compact_job(children[-1]))
    # The first status follows shortly, folded together with the new Job's own events: creating children for
    # the next object does not wait behind it.
    shared.request_refresh(key, lambda: refresh(key))


def refresh(key: tuple[str, str, str]) -> None:
    """Recomputes status from the cached Job and pods."""
    owner = shared.live_owner(key)
    if owner is None:
        return
    jobs = [j for j in cache.JOBS.get(key) if j["metadata"]["name"] == key[2]]
    job = jobs[0] if jobs else None
    if job is None and shared.known_status(owner).get("phase") in FINISHED:
        return  # its Job was deleted after it finished: the result stands
    pods = [p for p in cache.PODS.get(key) if p["metadata"]["labels"].get("job-name") == key[2]]
    fields, conds = statuses.finetune(job, pods)
    shared.recheck_if_awaiting_result(key, conds, refresh)
    fields["progressText"] = fields.get("progressText") or {"Pending": "pending", "Running": "starting",
                                                            "Failed": "failed"}.get(fields["phase"], "")
    shared.write_status(owner, fields, conds)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def owner_changed(body: kopf.Body, namespace: str, name: str, type: str | None, **_: Any) -> None:
    shared.track_owner(KIND, dict(body), namespace, name, type)


@kopf.on.event("batch", "v1", "jobs", labels={"ragtune.io/finetunejob": kopf.PRESENT})
async def job_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    deleted = type == "DELETED"
    shared.child_event(KIND, cache.JOBS, cache.compact_job, namespace, dict(body), labels, type,
                       recreate_if_unfinished if deleted else refresh)


def recreate_if_unfinished(key: tuple[str, str, str]) -> None:
    """A Job deleted by hand before it finished is created again (the run resumes from its last checkpoint), so
    the FineTuneJob never waits on a Job that no longer exists."""
    owner = unfinished(key)
    if owner is None:
        return
    children = builder.build(owner, parse_spec(owner["spec"]))
    shared.apply_children(owner, children)
    cache.JOBS.put(key, key[2], cache.compact_job(children[-1]))
    cache.PODS.forget(key)
    refresh(key)


@kopf.on.event("", "v1", "configmaps", labels={"ragtune.io/finetunejob": kopf.PRESENT})
async def run_config_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None,
                             **_: Any) -> None:
    """The run's ConfigMap deleted or edited by somebody else while it trains is put back: a retried pod would
    otherwise wait for it, or train from another config. A finished run's is left as it is."""
    shared.restore_on_drift(KIND, "ConfigMap", dict(body), namespace, labels, type, restore_config)


def unfinished(key: tuple[str, str, str]) -> dict[str, Any] | None:
    """The FineTuneJob if it exists, is not being deleted and has not finished."""
    owner = shared.live_owner(key)
    return None if owner is None or shared.known_status(owner).get("phase") in FINISHED else owner


def restore_config(key: tuple[str, str, str]) -> None:
    owner = unfinished(key)
    if owner is None:
        return
    children = builder.build(owner, parse_spec(owner["spec"]))
    shared.apply_children(owner, [child for child in children if child["kind"] == "ConfigMap"])


@kopf.on.event("", "v1", "pods", labels={"ragtune.io/finetunejob": kopf.PRESENT})
async def pod_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    shared.child_event(KIND, cache.PODS, cache.compact_pod, namespace, dict(body), labels, type, refresh)

