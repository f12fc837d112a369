"""What the three controllers share: the API client, per-object locks, status writes, metrics."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import kopf
from pydantic import ValidationError
from prometheus_client import Counter, Histogram

from .. import conditions as c
from .. import statuses
from ..builders import common
from . import cache
from ..kube import FIELD_MANAGER, Api, OwnershipConflict

log = logging.getLogger(__name__)
RECONCILES = Counter("ragtune_reconciles_total", "Reconciliations by kind and result", ["kind", "result"])
ERRORS = Counter("ragtune_reconcile_errors_total", "Reconciliations that raised, by kind", ["kind"])
DURATION = Histogram("ragtune_reconcile_duration_seconds", "Reconciliation time by kind", ["kind"],
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RETAIN_ANNOTATION = "ragtune.io/deletion-policy"

_api: Api | None = None
_api_lock = threading.Lock()
_object_locks: dict[tuple[str, str, str], threading.RLock] = defaultdict(threading.RLock)
_locks_guard = threading.Lock()
_workload_rbac_done: set[str] = set()
# Children known not to exist as their owner's, by (kind, namespace, name): `remove_child` asks the API once.
_absent: set[tuple[str, str, str]] = set()
# What each child showed last, by (kind, namespace, name): its generation (a changed spec shows as a new one) and
# the labels and annotations of the kinds ragtune sets (`own_marks`).
_seen: dict[tuple[str, str, str], tuple[int | None, dict[str, str]]] = {}
OWN_MARK_PREFIXES = ("ragtune.io/", "app.kubernetes.io/")
# Owners one of whose children's names somebody else's object holds, by (kind, namespace, name): the message.
CONFLICTS: dict[tuple[str, str, str], str] = {}
CONFLICT_RETRY_SECONDS = 30
# Every kind the controllers read or write, resolved once at start.
CHILD_KINDS = [("v1", "ConfigMap"), ("v1", "Pod"), ("v1", "Secret"), ("v1", "Service"), ("v1", "ServiceAccount"),
               ("v1", "PersistentVolumeClaim"), ("batch/v1", "Job"), ("batch/v1", "CronJob"),
               ("apps/v1", "Deployment"), ("rbac.authorization.k8s.io/v1", "Role"),
               ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("policy/v1", "PodDisruptionBudget"),
               ("apiextensions.k8s.io/v1", "CustomResourceDefinition"), ("ray.io/v1", "RayService")]


def api() -> Api:
    global _api
    with _api_lock:
        if _api is None:
            _api = Api()
        return _api


def warm_up() -> None:
    """The API client and resource discovery, before the first handler needs them. Best effort: a handler that
    finds them missing builds them itself."""
    try:
        api().warm(CHILD_KINDS)
    except Exception as exc:  # discovery can fail in many ways (an aggregated API down); none should stop a start
        log.warning("API discovery at start failed, continuing lazily: %s", exc)


def object_lock(kind: str, namespace: str, name: str) -> threading.RLock:
    with _locks_guard:
        return _object_locks[(kind, namespace, name)]


def instrumented(kind: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except InvalidSpec as exc:  # the object says why, not only the operator's log
                RECONCILES.labels(kind, "error").inc()
                report_invalid_spec(kind, dict(kwargs["body"]), exc)
                raise
            except kopf.TemporaryError:
                RECONCILES.labels(kind, "retry").inc()
                raise
            except Exception:
                ERRORS.labels(kind).inc()
                RECONCILES.labels(kind, "error").inc()
                raise
            finally:
                DURATION.labels(kind).observe(time.perf_counter() - started)
            RECONCILES.labels(kind, "success").inc()
            return result
        return run
    return wrap


def ensure_workload_identity(namespace: str, owner: dict[str, Any] | None = None) -> None:
    """The workloads' ServiceAccount, Role and RoleBinding in `namespace`, made once. With `owner` (the object
    whose reconcile needs them), a name somebody else's object holds is reported on the owner (`apply_children`)."""
    if namespace in _workload_rbac_done:
        return
    with object_lock("WorkloadIdentity", namespace, ""):  # the first object of a namespace does it; the rest wait
        if namespace in _workload_rbac_done:
            return
        for obj in common.workload_rbac(namespace):
            if owner is None:
                api().ensure(obj)
            else:
                ensure_for(owner, obj)
        _workload_rbac_done.add(namespace)


@kopf.on.event("", "v1", "serviceaccounts", labels={"app.kubernetes.io/managed-by": common.MANAGED_BY})
def workload_identity_changed(name: str, namespace: str, type: str | None, **_: Any) -> None:
    """The workloads' ServiceAccount deleted (by hand, or with a namespace that was then made again): every Job or
    pod of ragtune's there would wait for it forever, so it is made again while ragtune objects remain."""
    if type != "DELETED" or name != common.WORKLOAD_SERVICE_ACCOUNT:
        return
    _workload_rbac_done.discard(namespace)
    in_use = any(key[1] == namespace and body is not None
                 for kind in ("FineTuneJob", "VectorIndex", "HybridEndpoint") for key, body in cache.OWNERS.items(kind))
    if in_use:
        try:
            ensure_workload_identity(namespace)
        except Exception as exc:  # the namespace may be going away with it
            log.warning("the workloads' identity in %s could not be made again: %s", namespace, exc)


def apply_children(body: dict[str, Any], children: list[dict[str, Any]]) -> dict[str, str]:
    """Adopts and applies each child; returns name → created|configured|unchanged. A child whose name is taken by
    somebody else's object is not written: the owner's conditions say which object and what to do, and the
    reconcile is tried again in 30 s (nothing watches the other object)."""
    key = (body["kind"], body["metadata"]["namespace"], body["metadata"]["name"])
    outcome = {}
    for child in children:
        if (child["metadata"].get("annotations") or {}).get(RETAIN_ANNOTATION) == "Retain":
            # Kept when the owner goes (deletion policy Retain): labelled, namespaced, but not owned.
            kopf.label(child, {"app.kubernetes.io/managed-by": common.MANAGED_BY})
        else:
            kopf.adopt(child, owner=body)
        _absent.discard((child["kind"], key[1], child["metadata"]["name"]))
        outcome[f"{child['kind']}/{child['metadata']['name']}"] = ensure_for(body, child)
    if CONFLICTS.pop(key, None) is not None:
        log.info("%s %s/%s: the name conflict is over", *key)
    return outcome


def ensure_for(owner: dict[str, Any], obj: dict[str, Any]) -> str:
    """`Api.ensure` for an object `owner`'s reconcile needs; a name somebody else's object holds goes on the owner's
    conditions (`conflict_conditions`) and ends the reconcile, to be tried again."""
    try:
        return api().ensure(obj)
    except OwnershipConflict as conflict:
        key = (owner["kind"], owner["metadata"]["namespace"], owner["metadata"]["name"])
        message = f"{conflict}; tried again every {CONFLICT_RETRY_SECONDS} s"
        if CONFLICTS.get(key) != message:
            CONFLICTS[key] = message
            log.warning("%s %s/%s: %s", *key, message)
            write_status(owner, {}, [])
        raise kopf.TemporaryError(message, delay=CONFLICT_RETRY_SECONDS) from conflict


def remove_child(body: dict[str, Any], api_version: str, kind: str, name: str) -> None:
    """Deletes a child its owner no longer wants, if the owner controls it (an object of that name that somebody
    else made stays). Asks the API once; after that the child is known absent until `apply_children` makes it."""
    namespace = body["metadata"]["namespace"]
    if (kind, namespace, name) in _absent:
        return
    api().delete_controlled(api_version, kind, name, namespace, body["metadata"]["uid"])
    _absent.add((kind, namespace, name))


def conflict_conditions(key: tuple[str, str, str], desired: list[dict[str, Any]],
                        current: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """`desired` as it stands while a child's name is taken by somebody else's object (`apply_children`): not
    progressing, for that reason; Ready only if it was Ready before (what it served then still serves), never
    becoming Ready while a child is missing."""
    message = CONFLICTS.get(key)
    if message is None:
        return desired
    serving = c.is_true(desired, c.READY) and c.is_true(current, c.READY)
    replaced = (c.PROGRESSING,) if serving else (c.PROGRESSING, c.READY)
    added = [c.condition(c.PROGRESSING, False, c.OWNERSHIP_CONFLICT, message)]
    if not serving:
        added.insert(0, c.condition(c.READY, False, c.OWNERSHIP_CONFLICT, message))
    return added + [cond for cond in desired if cond["type"] not in replaced]


def own_marks(meta: dict[str, Any]) -> dict[str, str]:
    """The labels and annotations under the prefixes ragtune sets on its children (`OWN_MARK_PREFIXES`)."""
    return {f"{where}/{key}": value for where in ("labels", "annotations")
            for key, value in (meta.get(where) or {}).items() if key.startswith(OWN_MARK_PREFIXES)}


def drifted(kind: str, body: dict[str, Any], event_type: str | None) -> bool:
    """Whether a child's watch event says somebody else deleted it or changed it: its spec (a new generation,
    for the kinds that have one), the labels or annotations ragtune sets (which change no generation) or, for
    kinds without a generation, anything, where the newest write was not ragtune's own (status updates do not
    count). The owner's reconcile then puts it back as the owner's spec says."""
    meta = body.get("metadata") or {}
    child = (kind, meta.get("namespace"), meta.get("name"))
    if event_type == "DELETED":
        _seen.pop(child, None)
        return True
    shown = (meta.get("generation"), own_marks(meta))
    previous = _seen.get(child)
    _seen[child] = shown
    if event_type != "MODIFIED" or (shown[0] is not None and shown == previous):
        return False
    return last_writer(meta) != FIELD_MANAGER


def restore_on_drift(owner_kind: str, child_kind: str, body: dict[str, Any], namespace: str,
                     labels: dict[str, str], event_type: str | None, restore: Callable[[tuple[str, str, str]], None],
                     work: str = "restore") -> None:
    """Schedules `restore(owner's key)` when a child's watch event says somebody else deleted or changed it."""
    name = owner_of(labels, owner_kind)
    if name and drifted(child_kind, body, event_type):
        key = (owner_kind, namespace, name)
        request_refresh(key, lambda: restore(key), work=work)


def last_writer(meta: dict[str, Any]) -> str | None:
    """The field manager of the newest write to an object other than to its status (managedFields); on a tie,
    another manager than ragtune."""
    entries = [e for e in meta.get("managedFields") or [] if not e.get("subresource")]
    if not entries:
        return None
    newest = max(e.get("time") or "" for e in entries)
    writers = {e.get("manager") for e in entries if (e.get("time") or "") == newest}
    return next((w for w in sorted(writers, key=str) if w != FIELD_MANAGER), FIELD_MANAGER)


def status_key(body: dict[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return body["kind"], meta["namespace"], meta.get("uid") or meta["name"]


def known_status(body: dict[str, Any]) -> dict[str, Any]:
    """The object's status as ragtune last wrote it (the watch's copy may not have caught up yet), else the
    status on the body."""
    known = cache.STATUS.get(status_key(body))
    return known[1] if known else (body.get("status") or {})


def write_status(body: dict[str, Any], fields: dict[str, Any], desired: list[dict],
                 events: bool = True) -> dict[str, Any]:
    """Writes status fields and conditions only when something changed; stamps observedGeneration and posts an
    event for every condition transition. The base is the status ragtune last wrote for this object (uid), else
    the status on the body."""
    meta = body["metadata"]
    uid_key = status_key(body)
    current = known_status(body)
    generation = meta.get("generation")
    owner_key = (body["kind"], meta["namespace"], meta["name"])
    desired = conflict_conditions(owner_key, desired, current.get("conditions"))
    if owner_key in CONFLICTS and not c.is_true(desired, c.READY):
        fields = {**fields, "phase": "Pending"}
    merged = c.with_kstatus(c.merge_conditions(current.get("conditions"), desired, generation), generation)
    new_status = {**fields, "observedGeneration": generation, "conditions": merged}
    changes = {k: v for k, v in new_status.items() if current.get(k) != v}
    if not changes:
        return current
    if api().patch_status(body["kind"], meta["name"], meta["namespace"], replacing(current, changes)) is None:
        return current  # the object is gone
    cache.STATUS.put(uid_key, generation or 0, {**current, **changes})
    if events:
        for cond in c.transitions(current.get("conditions"), merged):
            if cond["type"] in (c.PROGRESSING, *c.KSTATUS):  # mirror Ready and Failed; one event is enough
                continue
            if cond["type"] == c.FAILED and cond["status"] == "False":  # not failing is no news; Ready says it
                continue
            kind = "Warning" if cond["reason"] in WARNING_REASONS else "Normal"
            api().event(body, kind, cond["reason"], f"{cond['type']}={cond['status']}: {cond['message']}")
    return {**current, **changes}


def replacing(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that replaces the changed fields: a JSON merge patch merges objects, so keys the new value no
    longer has (a running Job's progress counters, say) are nulled instead of lingering."""
    patch: dict[str, Any] = {}
    for key, value in changes.items():
        old = current.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            patch[key] = {**{k: None for k in old if k not in value}, **replacing(old, value)}
        else:
            patch[key] = value
    return patch


class Refresher:
    """Status refreshes triggered by child events run here, off kopf's handler pool: each object is refreshed at
    most once per `delay` however many events arrive (a Job's pod changes several times in a second), and
    creating children for new objects never waits behind status bookkeeping. Work that fails is tried again after
    a delay that doubles up to `retry_max`: a reconcile that met a passing API error must not leave its object
    waiting for an event that may never come."""

    def __init__(self, workers: int = 2, delay: float = 0.2, retry_first: float = 1.0, retry_max: float = 60.0):
        self.delay = delay
        self.retry_first, self.retry_max = retry_first, retry_max
        self._failures: dict[tuple[tuple[str, str, str], str], int] = {}  # (key, work) → failures in a row
        self._workers = workers
        self._cond = threading.Condition()
        # key → work name → (due time, callable): different kinds of work for one object (a status refresh, a
        # lost Job's re-creation, an endpoint's reconcile, a check much later) each run when they are due;
        # repeats of one kind fold together, at the earlier of their due times.
        self._due: dict[tuple[str, str, str], dict[str, tuple[float, Callable[[], None]]]] = {}
        self._threads: list[threading.Thread] = []

    def schedule(self, key: tuple[str, str, str], run: Callable[[], None], work: str,
                 delay: float | None = None) -> None:
        due = time.monotonic() + (self.delay if delay is None else delay)
        with self._cond:
            pending = self._due.setdefault(key, {})
            if work in pending:
                due, run = min(due, pending[work][0]), pending[work][1]
            pending[work] = (due, run)
            self._cond.notify()
            if not self._threads:
                for i in range(self._workers):
                    thread = threading.Thread(target=self._loop, name=f"ragtune-refresh-{i}", daemon=True)
                    thread.start()
                    self._threads.append(thread)

    def _next(self) -> tuple[tuple[str, str, str], list[tuple[str, Callable[[], None]]]]:
        """The next object with work due, and all of its work that is due (in the order it was asked for)."""
        with self._cond:
            while True:
                if self._due:
                    key, pending = min(self._due.items(), key=lambda item: min(due for due, _ in item[1].values()))
                    now = time.monotonic()
                    wait = min(due for due, _ in pending.values()) - now
                    if wait <= 0:
                        ready = [(work, run) for work, (due, run) in pending.items() if due <= now]
                        for work, _ in ready:
                            del pending[work]
                        if not pending:
                            del self._due[key]
                        return key, ready
                    self._cond.wait(wait)
                else:
                    self._cond.wait()

    def _loop(self) -> None:
        while True:
            key, runs = self._next()
            for work, run in runs:
                try:
                    with object_lock(*key):
                        run()
                except kopf.PermanentError:  # retrying cannot help (an invalid spec); its handler said why
                    log.exception("%s of %s/%s/%s failed for good", work, *key)
                    self._failures.pop((key, work), None)
                except Exception:  # one object's failure must not stop the others' work; it is tried again later
                    failures = self._failures.get((key, work), 0) + 1
                    self._failures[(key, work)] = failures
                    delay = min(self.retry_max, self.retry_first * 2 ** (failures - 1))
                    log.exception("%s of %s/%s/%s failed (%d in a row); again in %.0fs", work, *key, failures, delay)
                    self.schedule(key, run, work, delay=delay)
                else:
                    self._failures.pop((key, work), None)


REFRESHER = Refresher()


def request_refresh(key: tuple[str, str, str], run: Callable[[], None], work: str = "refresh",
                    delay: float | None = None) -> None:
    REFRESHER.schedule(key, run, work, delay)


def recheck_if_awaiting_result(key: tuple[str, str, str], conds: list[dict[str, Any]],
                               refresh: Callable[[tuple[str, str, str]], None]) -> None:
    """A run whose Job completed without its report yet is looked at again once the report is overdue
    (`statuses.RESULT_GRACE_SECONDS`): no event may come to fail it otherwise."""
    if any(cond["reason"] == c.AWAITING_RESULT for cond in conds):
        request_refresh(key, lambda: refresh(key), work="overdue-result", delay=statuses.RESULT_GRACE_SECONDS + 1)


def compact_owner(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": {**{k: meta.get(k) for k in ("name", "namespace", "uid", "generation",
                                                     "deletionTimestamp")},
                         "labels": dict(meta.get("labels") or {})},
            "spec": body.get("spec"), "status": body.get("status")}


class InvalidSpec(kopf.PermanentError):
    """A spec the operator's models refuse that admission let through: the installed CRDs are older than the
    operator (Helm installs a chart's CRDs but never upgrades them). Retrying cannot help."""


def parse_spec(model: type[Any], spec: dict[str, Any]) -> Any:
    """The spec as its pydantic model. Admission should have refused an invalid one; if one got through, say which
    field is wrong and stop retrying."""
    try:
        return model.model_validate(dict(spec))
    except ValidationError as exc:
        problems = "; ".join(f"spec.{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                             for error in exc.errors())
        raise InvalidSpec(f"invalid spec: {problems}. Fix the field and apply the object again (a FineTuneJob's "
                          "spec cannot change: delete it and create it again); admission did not refuse it, so "
                          "the installed CRDs are older than the operator: apply this release's crds/") from exc


def report_invalid_spec(kind: str, body: dict[str, Any], exc: InvalidSpec) -> None:
    """Reason InvalidSpec with the fields to fix on the object's conditions. What an index or an endpoint already
    serves stays served (the last valid spec's workload is left as it is), and Ready says so."""
    message = str(exc)
    current = known_status(body)
    serving = bool(current.get("activeVersion") if kind == "VectorIndex" else
                   current.get("served") if kind == "HybridEndpoint" else False)
    kept = "; the previous version keeps serving" if serving else ""
    conds = [c.condition(c.READY, serving, c.INVALID_SPEC, message + kept),
             c.condition(c.PROGRESSING, False, c.INVALID_SPEC, message)]
    fields: dict[str, Any] = {"phase": "Degraded" if serving and kind == "HybridEndpoint" else "Failed"}
    if kind != "HybridEndpoint":
        conds.append(c.condition(c.FAILED, True, c.INVALID_SPEC, message))
        fields["progressText"] = "invalid spec"
    try:
        write_status(body, fields, conds)
    except Exception:  # the log still has it
        log.exception("could not report the invalid spec of %s %s/%s", kind, body["metadata"].get("namespace"),
                      body["metadata"].get("name"))


def live_owner(key: tuple[str, str, str]) -> dict[str, Any] | None:
    """The cached owner, unless it is gone or being deleted (nothing is to be written for it then)."""
    owner = cache.OWNERS.get(key)
    return None if owner is None or owner["metadata"].get("deletionTimestamp") else owner


def remember_owner(kind: str, body: kopf.Body, namespace: str, name: str) -> tuple[tuple[str, str, str], dict]:
    """The handler's object, compacted and cached for the refreshes its children's events trigger."""
    key = (kind, namespace, name)
    obj = compact_owner(dict(body))
    cache.OWNERS.put(key, obj)
    return key, obj


def track_owner(kind: str, body: dict[str, Any], namespace: str, name: str, event_type: str | None) -> bool:
    """Keeps the owner cache current from the owner's own watch events; True when the owner is gone."""
    key = (kind, namespace, name)
    if event_type == "DELETED":
        cache.OWNERS.put(key, None)
        cache.JOBS.forget(key)
        cache.PODS.forget(key)
        # The status base is kept by uid, which a deleted object never gets back: without this, every object
        # that ever existed would stay in memory.
        cache.STATUS.forget((kind, namespace, (body.get("metadata") or {}).get("uid") or name))
        CONFLICTS.pop(key, None)
        return True
    cache.OWNERS.put(key, compact_owner(body))
    return False


def child_event(kind: str, cache_: cache.ChildCache, compact: Callable, namespace: str, body: dict[str, Any],
                labels: dict[str, str] | None, event_type: str | None,
                refresh: Callable[[tuple[str, str, str]], None]) -> tuple[str, str, str] | None:
    """Records a Job's or Pod's change and schedules its owner's status refresh. The initial listing (type None)
    only fills the cache: after a restart the resume handlers refresh from the API."""
    key = record_child(kind, cache_, compact, namespace, body, labels, event_type)
    if key and event_type is not None:
        request_refresh(key, lambda: refresh(key), work=refresh.__name__)
    return key


def record_child(kind: str, cache_: cache.ChildCache, compact: Callable, namespace: str, body: dict[str, Any],
                 labels: dict[str, str] | None, event_type: str | None) -> tuple[str, str, str] | None:
    """Keeps the child cache current; returns the owner key it belongs to."""
    owner = owner_of(labels, kind)
    if not owner:
        return None
    key = (kind, namespace, owner)
    if event_type == "DELETED":
        cache_.delete(key, body["metadata"]["name"], body["metadata"].get("uid"))
    else:
        cache_.put(key, body["metadata"]["name"], compact(body))
    return key


WARNING_REASONS = {c.JOB_FAILED, c.BACKOFF_LIMIT_EXCEEDED, c.DEADLINE_EXCEEDED, c.UNSCHEDULABLE,
                   c.BASE_MODEL_MISMATCH, c.ADAPTER_NOT_PROMOTABLE, c.REFERENCE_FAILED, c.REFERENCE_NOT_FOUND,
                   c.EVALUATION_BELOW_THRESHOLD, c.MINIMUM_REPLICAS_UNAVAILABLE, c.RESULT_MISSING, c.INVALID_SPEC,
                   c.OWNERSHIP_CONFLICT,
                   *statuses.STUCK}


def owner_of(labels: dict[str, str] | None, kind: str) -> str | None:
    return (labels or {}).get(f"ragtune.io/{kind.lower()}")
