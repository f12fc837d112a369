"""VectorIndex: one indexing Job per spec version (+ a CronJob for refreshes); the active version stays Ready
while a new one builds."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .. import GROUP, VERSION
from .. import statuses
from ..api.vectorindex import VectorIndexSpec
from ..builders import common
from ..builders import index as builder
from . import cache, shared

PLURAL = "vectorindexes"
KIND = "VectorIndex"
JOB_HISTORY = 2
log = logging.getLogger(__name__)


def parse_spec(spec: dict[str, Any]) -> VectorIndexSpec:
    return shared.parse_spec(VectorIndexSpec, spec)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@shared.instrumented(KIND)
def reconcile(body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, reason: str, **_: Any) -> None:
    parsed = parse_spec(spec)
    key, obj = shared.remember_owner(KIND, body, namespace, name)
    children = builder.build(obj, parsed)
    with shared.object_lock(*key):
        shared.ensure_workload_identity(namespace, obj)
        outcome = shared.apply_children(obj, children)
        if not parsed.schedule:
            shared.remove_child(obj, "batch/v1", "CronJob", f"{name}-refresh")
        current = builder.names(common.owner_info(obj), parsed)["job"]
        if reason == "resume" or outcome.get(f"Job/{current}") != "created":
            # After a restart the caches are cold (see the FineTuneJob controller): read the Jobs and their pods
            # once from the API.
            jobs = shared.api().list("batch/v1", "Job", namespace, {"ragtune.io/vectorindex": name})
            pods = shared.api().list("v1", "Pod", namespace, {"ragtune.io/vectorindex": name})
            cache.JOBS.fill(key, {j["metadata"]["name"]: cache.compact_job(j) for j in jobs})
            cache.PODS.fill(key, {p["metadata"]["name"]: cache.compact_pod(p) for p in pods})
        if not any(j["metadata"]["name"] == current for j in cache.JOBS.get(key)):
            job = next(c for c in children if c["kind"] == "Job")
            cache.JOBS.put(key, current, cache.compact_job(job))
        prune_jobs(key, current)
    shared.request_refresh(key, lambda: refresh(key))


def prune_jobs(key: tuple[str, str, str], current: str) -> None:
    """Finished Jobs of earlier spec versions beyond the history limit go (with their pods)."""
    _, namespace, name = key
    jobs = [j for j in cache.JOBS.get(key)
            if j["metadata"]["name"] != current and not j["metadata"]["name"].startswith(f"{name}-refresh-")
            and not (j.get("status") or {}).get("active")]
    jobs.sort(key=lambda j: j["metadata"].get("creationTimestamp") or "", reverse=True)
    for job in jobs[JOB_HISTORY:]:
        shared.api().delete("batch/v1", "Job", job["metadata"]["name"], namespace)


def latest_job(key: tuple[str, str, str], spec: VectorIndexSpec, owner: dict[str, Any]) -> dict | None:
    """The Job whose result the status shows: the spec version's own Job, or a newer scheduled refresh."""
    name = key[2]
    current = builder.names(common.owner_info(owner), spec)["job"]
    candidates = [j for j in cache.JOBS.get(key) if j["metadata"]["name"] == current
                  or j["metadata"]["name"].startswith(f"{name}-refresh-")]
    return max(candidates, key=lambda j: j["metadata"].get("creationTimestamp") or "~", default=None)


def refresh(key: tuple[str, str, str]) -> None:
    owner = shared.live_owner(key)
    if owner is None:
        return
    spec = parse_spec(owner["spec"])
    job = latest_job(key, spec, owner)
    pods = [p for p in cache.PODS.get(key)
            if job and p["metadata"]["labels"].get("job-name") == job["metadata"]["name"]]
    previous = shared.known_status(owner)
    fields, conds = statuses.vectorindex(job, pods, previous)
    shared.recheck_if_awaiting_result(key, conds, refresh)
    fields["progressText"] = fields.get("progressText") or {"Pending": "pending", "Running": "starting",
                                                            "Failed": "failed"}.get(fields["phase"], "")
    if spec.schedule:
        fields["nextRunTime"] = next_run(spec.schedule, spec.suspend)
    shared.write_status(owner, fields, conds)


def next_run(schedule: str, suspended: bool) -> str | None:
    if suspended:
        return None
    try:
        from croniter import croniter  # optional: the CronJob runs on schedule either way
    except ImportError:
        return None
    from datetime import datetime, timezone
    return croniter(schedule, datetime.now(timezone.utc)).get_next(datetime).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.event(GROUP, VERSION, PLURAL)
async def owner_changed(body: kopf.Body, namespace: str, name: str, type: str | None, **_: Any) -> None:
    shared.track_owner(KIND, dict(body), namespace, name, type)


@kopf.on.event("batch", "v1", "jobs", labels={"ragtune.io/vectorindex": kopf.PRESENT})
async def job_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    shared.child_event(KIND, cache.JOBS, cache.compact_job, namespace, dict(body), labels, type, refresh)


def restore_children(key: tuple[str, str, str]) -> None:
    """Puts the index's ConfigMap and refresh CronJob back as its spec says, after somebody else deleted or
    changed them. Its Jobs are runs, not put back; neither is its volume (a new empty one would not hold the
    data)."""
    owner = shared.live_owner(key)
    if owner is None:
        return
    children = builder.build(owner, parse_spec(owner["spec"]))
    shared.apply_children(owner, [child for child in children if child["kind"] in ("ConfigMap", "CronJob")])


@kopf.on.event("", "v1", "configmaps", labels={"ragtune.io/vectorindex": kopf.PRESENT})
async def index_config_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None,
                               **_: Any) -> None:
    shared.restore_on_drift(KIND, "ConfigMap", dict(body), namespace, labels, type, restore_children)


@kopf.on.event("batch", "v1", "cronjobs", labels={"ragtune.io/vectorindex": kopf.PRESENT})
async def cronjob_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None,
                          **_: Any) -> None:
    shared.restore_on_drift(KIND, "CronJob", dict(body), namespace, labels, type, restore_children)


@kopf.on.event("", "v1", "pods", labels={"ragtune.io/vectorindex": kopf.PRESENT})
async def pod_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    shared.child_event(KIND, cache.PODS, cache.compact_pod, namespace, dict(body), labels, type, refresh)


def _drops_external_collection(spec: kopf.Spec, **_: Any) -> bool:
    return spec.get("deletionPolicy") == "Delete" and (spec.get("store") or {}).get("backend") == "milvus"


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_drops_external_collection, retries=3, backoff=5, timeout=120)
def drop_collection(body: kopf.Body, spec: kopf.Spec, namespace: str, name: str, retry: int, **_: Any) -> None:
    """Deletion policy Delete on a Milvus server: drop every version of the collection. Bounded retries and a
    timeout: after them the finalizer is released anyway with a warning, so deletion is never blocked forever."""
    parsed = parse_spec(spec)
    owner = common.owner_info(dict(body))
    collection = builder.collection_name(owner, parsed)
    try:
        dropped = drop_versions(parsed.store.uri, collection, token_for(parsed, namespace))
    except Exception as exc:
        if retry >= 2:
            shared.api().event(dict(body), "Warning", "CollectionNotDropped",
                               f"giving up on dropping {collection} at {parsed.store.uri}: {exc}; drop it by hand")
            return
        raise kopf.TemporaryError(f"dropping {collection}: {exc}", delay=5) from exc
    shared.api().event(dict(body), "Normal", "CollectionDropped", f"dropped {', '.join(dropped) or 'nothing'}")


def token_for(spec: VectorIndexSpec, namespace: str) -> str | None:
    ref = spec.store.token_secret
    if not ref:
        return None
    secret = shared.api().get("v1", "Secret", ref.name, namespace)
    import base64
    data = ((secret or {}).get("data") or {}).get(ref.key)
    return base64.b64decode(data).decode() if data else None


def drop_versions(uri: str, collection: str, token: str | None) -> list[str]:
    from pymilvus import MilvusClient  # only needed for deletion policy Delete on a Milvus server
    milvus = MilvusClient(uri=uri, token=token or "", timeout=20)
    try:
        dropped = []
        names = [n for n in milvus.list_collections() if n == collection or n.startswith(f"{collection}_v")]
        try:
            milvus.drop_alias(alias=collection)
        except Exception:  # no alias by that name
            pass
        for n in names:
            milvus.drop_collection(n)
            dropped.append(n)
        return dropped
    finally:
        milvus.close()
