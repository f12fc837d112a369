"""HybridEndpoint: resolve the FineTuneJob and VectorIndex it references, then run Ray Serve (RayService or a
Deployment) with them. A changed reference rolls the running endpoint to the new artifact; until the new one is
Ready the old one keeps serving."""

from __future__ import annotations

from typing import Any

import kopf

from .. import GROUP, VERSION
from .. import conditions as c
from .. import statuses
from ..api.finetunejob import FineTuneJobSpec
from ..api.hybridendpoint import HybridEndpointSpec
from ..api.vectorindex import VectorIndexSpec
from ..builders import common
from ..builders import endpoint as builder
from ..builders import finetune as finetune_builder
from ..builders import index as index_builder
from . import cache, shared

PLURAL = "hybridendpoints"
KIND = "HybridEndpoint"
RAYSERVICE_CRD = "rayservices.ray.io"


class Unresolved(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_spec(spec: dict[str, Any]) -> HybridEndpointSpec:
    return shared.parse_spec(HybridEndpointSpec, spec)


@kopf.index(GROUP, VERSION, PLURAL)
def endpoint_references(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict:
    """(namespace, kind, referenced name) → this endpoint's name, so a referenced object's change finds us."""
    refs = {}
    adapter = (spec.get("model") or {}).get("adapter") or {}
    if (adapter.get("fineTuneJobRef") or {}).get("name"):
        refs[(namespace, "FineTuneJob", adapter["fineTuneJobRef"]["name"])] = name
    if ((spec.get("retrieval") or {}).get("vectorIndexRef") or {}).get("name"):
        refs[(namespace, "VectorIndex", spec["retrieval"]["vectorIndexRef"]["name"])] = name
    return refs


def lookup(kind: str, plural: str, namespace: str, name: str) -> dict | None:
    """A referenced object from the watch cache; from the API when the cache has not seen it (yet)."""
    found = cache.OWNERS.get((kind, namespace, name))
    if found is None:
        found = shared.api().get_custom(plural, name, namespace)
        if found is not None:
            cache.OWNERS.put((kind, namespace, name), shared.compact_owner(found))
    return found


def resolve_adapter(spec: HybridEndpointSpec, namespace: str) -> builder.ResolvedAdapter | None:
    if spec.mode == "rag" or spec.model.adapter is None:
        return None
    adapter = spec.model.adapter
    if adapter.uri:
        # an adapter URI in S3 is read with the model's S3 endpoint and credentials, where the model is in S3 too
        model_s3 = spec.model.s3 if spec.model.source == "s3" else None
        return builder.ResolvedAdapter(name="adapter", uri=adapter.uri, digest=None, base_model=spec.model.name,
                                       s3_endpoint=model_s3.endpoint if model_s3 else None,
                                       s3_credentials_secret=model_s3.credentials_secret if model_s3 else None)
    ref = adapter.fine_tune_job_ref.name
    ftj = lookup("FineTuneJob", "finetunejobs", namespace, ref)
    if ftj is None:
        raise Unresolved(c.REFERENCE_NOT_FOUND, f"FineTuneJob {ref} not found in {namespace}")
    ftj_spec = FineTuneJobSpec.model_validate(ftj["spec"])
    if ftj_spec.model.name != spec.model.name:
        raise Unresolved(c.BASE_MODEL_MISMATCH, f"FineTuneJob {ref} adapts {ftj_spec.model.name} but the endpoint "
                         f"serves {spec.model.name}: set spec.model.name to {ftj_spec.model.name} or reference an "
                         "adapter of this base model")
    status = ftj.get("status") or {}
    if c.is_true(status.get("conditions"), c.FAILED):
        raise Unresolved(c.REFERENCE_FAILED, f"FineTuneJob {ref} failed: "
                         f"{(c.get(status.get('conditions'), c.FAILED) or {}).get('message', '')}")
    artifact = status.get("artifact") or {}
    if not c.is_true(status.get("conditions"), c.READY) or not artifact.get("digest"):
        raise Unresolved(c.WAITING_FOR_FINE_TUNE_JOB, f"waiting for FineTuneJob {ref} to be Ready "
                         f"({status.get('progressText') or status.get('phase') or 'pending'})")
    if adapter.require_promotable and not artifact.get("promotable", True):
        promotable = c.get(status["conditions"], c.PROMOTABLE)
        raise Unresolved(c.ADAPTER_NOT_PROMOTABLE, f"FineTuneJob {ref}'s adapter missed its evaluation thresholds "
                         f"({promotable['message'] if promotable else ''}); "
                         "set model.adapter.requirePromotable=false to serve it anyway")
    owner = common.owner_info(ftj)
    claim, sub_path = None, ""
    if ftj_spec.output.pvc:
        claim = ftj_spec.output.pvc.claim_name
        sub_path = finetune_builder.workload_config(owner, ftj_spec).output_path.removeprefix(
            finetune_builder.OUTPUT_MOUNT).strip("/")
        sub_path = f"{sub_path}/adapter".strip("/")
    output_s3 = ftj_spec.output.s3
    return builder.ResolvedAdapter(name=ref, uri=artifact.get("uri") or finetune_builder.artifact_uri(owner, ftj_spec),
                                   digest=artifact["digest"], base_model=ftj_spec.model.name, claim_name=claim,
                                   sub_path=sub_path, s3_endpoint=output_s3.endpoint if output_s3 else None,
                                   s3_credentials_secret=output_s3.credentials_secret if output_s3 else None)


def resolve_index(spec: HybridEndpointSpec, namespace: str) -> builder.ResolvedIndex | None:
    if spec.mode == "finetuned" or spec.retrieval is None:
        return None
    ref = spec.retrieval.vector_index_ref.name
    vix = lookup("VectorIndex", "vectorindexes", namespace, ref)
    if vix is None:
        raise Unresolved(c.REFERENCE_NOT_FOUND, f"VectorIndex {ref} not found in {namespace}")
    status = vix.get("status") or {}
    if not c.is_true(status.get("conditions"), c.READY) or not status.get("activeVersion"):
        if c.is_true(status.get("conditions"), c.FAILED):
            raise Unresolved(c.REFERENCE_FAILED, f"VectorIndex {ref} failed: "
                             f"{(c.get(status.get('conditions'), c.FAILED) or {}).get('message', '')}")
        raise Unresolved(c.WAITING_FOR_VECTOR_INDEX, f"waiting for VectorIndex {ref} to be Ready "
                         f"({status.get('progressText') or status.get('phase') or 'pending'})")
    vspec = VectorIndexSpec.model_validate(vix["spec"])
    owner = common.owner_info(vix)
    claim = index_builder.store_claim(owner, vspec)
    return builder.ResolvedIndex(
        # readers open the alias (milvus-lite: <root>/<alias>/current.json; a server: the Milvus alias), which the
        # index swaps to each new version; the versioned collection behind it is the index's business
        name=ref, collection=index_builder.collection_name(owner, vspec),
        store_uri=index_builder.store_uri(owner, vspec),
        embedding_model=status.get("embeddingModel") or vspec.embedding.model, version=status.get("activeVersion"),
        claim_name=claim[0] if claim else None, query_prefix=vspec.embedding.query_prefix,
        embedding_claim=vspec.embedding.pvc.claim_name if vspec.embedding.source == "pvc" and vspec.embedding.pvc
        else None,
        embedding_path=vspec.embedding.pvc.path if vspec.embedding.source == "pvc" and vspec.embedding.pvc else "",
        token_secret=(vspec.store.token_secret.name, vspec.store.token_secret.key)
        if vspec.store.token_secret and not claim else None,
        sub_path=index_builder.store_uri(owner, vspec).removeprefix(index_builder.STORE_MOUNT).strip("/") if claim
        else "")


def runtime_for(spec: HybridEndpointSpec, status: dict[str, Any]) -> str:
    """`auto` is decided when an endpoint is first served: a RayService where KubeRay's CRD is installed, else a
    Deployment. After that the endpoint keeps the runtime its status names: installing KubeRay does not move a
    serving endpoint (the move would delete its Deployment before a RayService serves). An endpoint on a
    RayService whose CRD is removed (its RayServices go with it) falls back to a Deployment."""
    if spec.runtime != "auto":
        return spec.runtime
    installed = shared.api().crd_installed(RAYSERVICE_CRD)
    if not installed or (status.get("served") and status.get("runtime") == "deployment"):
        return "deployment"
    return "rayservice"



@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@shared.instrumented(KIND)
def reconcile_handler(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    cache.OWNERS.put((KIND, namespace, name), shared.compact_owner(dict(body)))
    reconcile(namespace, name)


def reconcile(namespace: str, name: str) -> None:
    """Resolves the references and applies the serving workload; leaves it untouched while they are not Ready."""
    key = (KIND, namespace, name)
    with shared.object_lock(*key):
        owner = lookup(KIND, PLURAL, namespace, name)
        if owner is None or owner["metadata"].get("deletionTimestamp"):
            return
        spec = parse_spec(owner["spec"])
        runtime = runtime_for(spec, shared.known_status(owner))
        try:
            adapter = resolve_adapter(spec, namespace)
            index = resolve_index(spec, namespace)
        except Unresolved as unresolved:
            refresh(key, unresolved=unresolved)
            return
        shared.ensure_workload_identity(namespace, owner)
        shared.apply_children(owner, builder.build(owner, spec, runtime, adapter, index))
        if not builder.wants_disruption_budget(spec, runtime):
            shared.remove_child(owner, "policy/v1", "PodDisruptionBudget", name)
        if runtime == "rayservice":
            shared.remove_child(owner, "apps/v1", "Deployment", name)
        elif shared.api().crd_installed(RAYSERVICE_CRD):
            shared.remove_child(owner, "ray.io/v1", "RayService", name)
        DESIRED[key] = {"adapter": adapter.name if adapter else None,
                        "adapterDigest": adapter.digest if adapter else None,
                        "index": index.name if index else None, "indexVersion": index.version if index else None}
        UNRESOLVED.pop(key, None)
        refresh(key)


# What the last reconcile applied, and why it could not: refreshes triggered by the workload's own changes
# report against these without resolving the references again.
DESIRED: dict[tuple[str, str, str], dict[str, Any]] = {}
UNRESOLVED: dict[tuple[str, str, str], Unresolved] = {}


def refresh(key: tuple[str, str, str], unresolved: Unresolved | None = None) -> None:
    owner = shared.live_owner(key)
    if owner is None:
        return
    if unresolved is not None:
        UNRESOLVED[key] = unresolved
    unresolved = UNRESOLVED.get(key)
    spec = parse_spec(owner["spec"])
    current = shared.known_status(owner)
    runtime = runtime_for(spec, current)
    kind = "RayService" if runtime == "rayservice" else "Deployment"
    workloads = [w for w in cache.JOBS.get(key) if w.get("kind") == kind]
    child = workloads[0] if workloads else None
    # Ray Serve autoscales a RayService's engine from minReplicas; a Deployment runs spec.replicas pods (which the
    # scale subresource lets kubectl scale, an HPA or KEDA set)
    wanted = spec.autoscaling.min_replicas if spec.autoscaling and runtime == "rayservice" else spec.replicas
    fields, conds = statuses.endpoint_workload(kind, child, wanted)
    info = common.owner_info(owner)
    fields.update({"runtime": runtime, "url": builder.url(info, spec),
                   "selector": builder.selector_text(info, runtime)})
    served = current.get("served")
    if unresolved is not None:
        conds.append(c.condition(c.REFERENCES_READY, False, unresolved.reason, unresolved.message))
        waiting = unresolved.reason in (c.WAITING_FOR_FINE_TUNE_JOB, c.WAITING_FOR_VECTOR_INDEX)
        if child is None:
            conds = [x for x in conds if x["type"] not in (c.READY, c.PROGRESSING)]
            conds += [c.condition(c.READY, False, unresolved.reason, unresolved.message),
                      c.condition(c.PROGRESSING, waiting, unresolved.reason, unresolved.message)]
            fields["phase"] = "Pending" if waiting else "Degraded"
        else:
            # The endpoint keeps serving what it served; the new reference is not rolled out yet.
            conds = [x for x in conds if x["type"] != c.PROGRESSING]
            conds.append(c.condition(c.PROGRESSING, waiting, unresolved.reason, unresolved.message))
    else:
        conds.append(c.condition(c.REFERENCES_READY, True, c.REFERENCES_RESOLVED, "references are Ready"))
        desired = DESIRED.get(key)
        rolled_out = child is not None and not c.is_true(conds, c.PROGRESSING) and c.is_true(conds, c.AVAILABLE)
        if desired and (rolled_out or not served):
            served = {k: v for k, v in desired.items() if v is not None}
    if served:
        fields["served"] = served
    shared.write_status(owner, fields, conds)
    if runtime == "rayservice" and key in DESIRED:
        schedule_resync(key, c.is_true(conds, c.READY))


def compact_workload(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {"kind": body.get("kind"), "metadata": {"name": meta.get("name"), "generation": meta.get("generation"),
                                                   "resourceVersion": meta.get("resourceVersion"),
                                                   "labels": dict(meta.get("labels") or {})},
            "status": dict(body.get("status") or {})}


def workload_changed(kind: str, body: dict[str, Any], namespace: str, labels: dict[str, str],
                     type: str | None) -> None:
    body = {**body, "kind": kind}
    key = shared.record_child(KIND, cache.JOBS, compact_workload, namespace, body, labels, type)
    if key:  # the initial listing too: after a restart it is what fills the workload cache
        shared.request_refresh(key, lambda: refresh(key))


@kopf.on.event("apps", "v1", "deployments", labels={"ragtune.io/hybridendpoint": kopf.PRESENT})
async def deployment_changed(body: kopf.Body, namespace: str, labels: dict[str, str],
                             type: str | None, **_: Any) -> None:
    workload_changed("Deployment", dict(body), namespace, labels, type)
    child_changed("Deployment", dict(body), namespace, labels, type)


def child_changed(kind: str, body: dict[str, Any], namespace: str, labels: dict[str, str],
                  type: str | None) -> None:
    """A child deleted or edited by somebody else (a Deployment's image changed by hand, the Service deleted) is
    put back as the endpoint's spec says: the endpoint is reconciled again."""
    shared.restore_on_drift(KIND, kind, body, namespace, labels, type, lambda key: reconcile(key[1], key[2]),
                            work="reconcile")


@kopf.on.event("", "v1", "services", labels={"ragtune.io/hybridendpoint": kopf.PRESENT})
async def service_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None,
                          **_: Any) -> None:
    child_changed("Service", dict(body), namespace, labels, type)


@kopf.on.event("", "v1", "configmaps", labels={"ragtune.io/hybridendpoint": kopf.PRESENT})
async def endpoint_config_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None,
                                  **_: Any) -> None:
    child_changed("ConfigMap", dict(body), namespace, labels, type)


@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels={"ragtune.io/hybridendpoint": kopf.PRESENT})
async def budget_changed(body: kopf.Body, namespace: str, labels: dict[str, str], type: str | None,
                         **_: Any) -> None:
    child_changed("PodDisruptionBudget", dict(body), namespace, labels, type)


# A RayService's state is read back on a cadence (faster while the endpoint is not Ready yet) rather than
# watched: KubeRay comes and goes with its CRD, and a watch of a resource whose CRD was just removed (or that the API
# server announces a moment before it serves it) fails with 404, which stops the whole operator. A read-back
# cannot miss an event either.
RESYNC_SECONDS = {"ready": 15.0, "pending": 3.0}


def schedule_resync(key: tuple[str, str, str], ready: bool) -> None:
    shared.request_refresh((f"{KIND}/resync", key[1], key[2]), lambda: resync(key), work="resync",
                           delay=RESYNC_SECONDS["ready" if ready else "pending"])


def resync(key: tuple[str, str, str]) -> None:
    owner = shared.live_owner(key)
    if owner is None or key not in DESIRED:
        return
    if runtime_for(parse_spec(owner["spec"]), shared.known_status(owner)) != "rayservice":
        return
    _, namespace, name = key
    current = shared.api().get("ray.io/v1", "RayService", name, namespace) or {}
    labels = (current.get("metadata") or {}).get("labels") or {}
    if shared.owner_of(labels, KIND) == name:
        cached = next((w for w in cache.JOBS.get(key) if w.get("kind") == "RayService"), None)
        if cached is None or cached["metadata"].get("resourceVersion") != current["metadata"].get("resourceVersion"):
            workload_changed("RayService", current, namespace, labels, "MODIFIED")
            child_changed("RayService", current, namespace, labels, "MODIFIED")
    elif not current:  # deleted by someone: made again (reconcile), and reported as being created meanwhile
        forget_rayservices(key)
        shared.request_refresh(key, lambda: reconcile(namespace, name), work="reconcile")
    schedule_resync(key, c.is_true((current.get("status") or {}).get("conditions"), c.READY))


def forget_rayservices(key: tuple[str, str, str]) -> None:
    """The endpoint's cached RayService is gone (deleted, or with its CRD): recorded as deleted, which refreshes
    the endpoint's status."""
    for workload in [w for w in cache.JOBS.get(key) if w.get("kind") == "RayService"]:
        workload_changed("RayService", workload, key[1], workload["metadata"]["labels"], "DELETED")


@kopf.on.event(GROUP, VERSION, PLURAL)
async def owner_changed(body: kopf.Body, namespace: str, name: str, type: str | None, **_: Any) -> None:
    if shared.track_owner(KIND, dict(body), namespace, name, type):
        DESIRED.pop((KIND, namespace, name), None)
        UNRESOLVED.pop((KIND, namespace, name), None)


@kopf.on.event("apiextensions.k8s.io", "v1", "customresourcedefinitions")
async def crd_changed(name: str, type: str | None, body: kopf.Body, **_: Any) -> None:
    """Installing or removing KubeRay changes what runtime auto means for endpoints not served yet; removing it
    also took the RayServices with it, so the endpoints that ran on one are served by a Deployment again."""
    if name != RAYSERVICE_CRD or type is None:
        return
    shared.api().forget_crd(name)
    if type != "DELETED" and not (body.get("metadata") or {}).get("deletionTimestamp"):
        return
    for key, owner in cache.OWNERS.items(KIND):  # reconciling one that already runs a Deployment writes nothing
        forget_rayservices(key)  # they go with the CRD: they no longer serve the endpoint
        if (owner.get("spec") or {}).get("runtime", "auto") == "auto":
            shared.request_refresh(key, lambda k=key: reconcile(k[1], k[2]), work="reconcile")


def _referencing(index: kopf.Index, namespace: str, kind: str, name: str) -> set[str]:
    return set(index.get((namespace, kind, name), []))


def reference_changed(kind: str, namespace: str, name: str, type: str | None, index: kopf.Index) -> None:
    if type is None:
        return
    # The referenced kind's own controller keeps it in the owner cache; here only its dependents react.
    for endpoint in _referencing(index, namespace, kind, name):
        key = (KIND, namespace, endpoint)
        shared.request_refresh(key, lambda e=endpoint: reconcile(namespace, e), work="reconcile")


@kopf.on.event(GROUP, VERSION, "finetunejobs")
async def finetunejob_changed(namespace: str, name: str, type: str | None,
                        endpoint_references: kopf.Index, **_: Any) -> None:
    reference_changed("FineTuneJob", namespace, name, type, endpoint_references)


@kopf.on.event(GROUP, VERSION, "vectorindexes")
async def vectorindex_changed(namespace: str, name: str, type: str | None,
                        endpoint_references: kopf.Index, **_: Any) -> None:
    reference_changed("VectorIndex", namespace, name, type, endpoint_references)
