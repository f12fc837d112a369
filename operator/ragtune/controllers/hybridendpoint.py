"""HybridEndpoint: resolve the FineTuneJob and VectorIndex it references, then run Ray Serve (RayService or a
Deployment) with them. A changed reference rolls the running endpoint to the new artifact; until the new one is
Ready the old one keeps serving."""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

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
from . import shared

PLURAL = "hybridendpoints"
KIND = "HybridEndpoint"
RAYSERVICE_CRD = "rayservices.ray.io"


class Unresolved(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_spec(spec: dict[str, Any]) -> HybridEndpointSpec:
    try:
        return HybridEndpointSpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc


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


def resolve_adapter(spec: HybridEndpointSpec, namespace: str) -> builder.ResolvedAdapter | None:
    if spec.mode == "rag" or spec.model.adapter is None:
        return None
    adapter = spec.model.adapter
    if adapter.uri:
        return builder.ResolvedAdapter(name="adapter", uri=adapter.uri, digest=None, base_model=spec.model.name)
    ref = adapter.fine_tune_job_ref.name
    ftj = shared.api().get_custom("finetunejobs", ref, namespace)
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
        raise Unresolved(c.ADAPTER_NOT_PROMOTABLE, f"FineTuneJob {ref}'s adapter missed its evaluation thresholds "
                         f"({c.get(status['conditions'], c.PROMOTABLE)['message'] if c.get(status['conditions'], c.PROMOTABLE) else ''}); "
                         "set model.adapter.requirePromotable=false to serve it anyway")
    owner = common.owner_info(ftj)
    claim, sub_path = None, ""
    if ftj_spec.output.pvc:
        claim = ftj_spec.output.pvc.claim_name
        sub_path = finetune_builder.workload_config(owner, ftj_spec).output_path.removeprefix(
            finetune_builder.OUTPUT_MOUNT).strip("/")
        sub_path = f"{sub_path}/adapter".strip("/")
    return builder.ResolvedAdapter(name=ref, uri=artifact.get("uri") or finetune_builder.artifact_uri(owner, ftj_spec),
                                   digest=artifact["digest"], base_model=ftj_spec.model.name, claim_name=claim,
                                   sub_path=sub_path)


def resolve_index(spec: HybridEndpointSpec, namespace: str) -> builder.ResolvedIndex | None:
    if spec.mode == "finetuned" or spec.retrieval is None:
        return None
    ref = spec.retrieval.vector_index_ref.name
    vix = shared.api().get_custom("vectorindexes", ref, namespace)
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
        name=ref, collection=status.get("activeCollection") or index_builder.collection_name(owner, vspec),
        store_uri=index_builder.store_uri(owner, vspec),
        embedding_model=status.get("embeddingModel") or vspec.embedding.model, version=status.get("activeVersion"),
        claim_name=claim[0] if claim else None,
        sub_path=index_builder.store_uri(owner, vspec).removeprefix(index_builder.STORE_MOUNT).strip("/") if claim
        else "")


def runtime_for(spec: HybridEndpointSpec) -> str:
    if spec.runtime != "auto":
        return spec.runtime
    return "rayservice" if shared.api().crd_installed(RAYSERVICE_CRD) else "deployment"


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@shared.instrumented(KIND)
def reconcile_handler(body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    reconcile(dict(body))


def reconcile(body: dict[str, Any]) -> None:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    with shared.object_lock(PLURAL, namespace, name):
        fresh = shared.api().get_custom(PLURAL, name, namespace)
        if fresh is None or fresh["metadata"].get("deletionTimestamp"):
            return
        spec = parse_spec(fresh["spec"])
        runtime = runtime_for(spec)
        try:
            adapter = resolve_adapter(spec, namespace)
            index = resolve_index(spec, namespace)
        except Unresolved as unresolved:
            refresh(fresh, spec, runtime, unresolved=unresolved)
            return
        shared.ensure_workload_identity(namespace)
        shared.apply_children(fresh, builder.build(fresh, spec, runtime, adapter, index))
        other = ("ray.io/v1", "RayService") if runtime == "deployment" else ("apps/v1", "Deployment")
        if runtime == "deployment" and not shared.api().crd_installed(RAYSERVICE_CRD):
            other = None
        if other:
            shared.api().delete(*other, name, namespace)
        desired = {"adapter": adapter.name if adapter else None, "adapterDigest": adapter.digest if adapter else None,
                   "index": index.name if index else None, "indexVersion": index.version if index else None}
        refresh(fresh, spec, runtime, desired=desired)


def refresh(body: dict[str, Any], spec: HybridEndpointSpec, runtime: str, unresolved: Unresolved | None = None,
            desired: dict[str, Any] | None = None) -> None:
    meta = body["metadata"]
    owner = common.owner_info(body)
    kind = "RayService" if runtime == "rayservice" else "Deployment"
    api_version = "ray.io/v1" if runtime == "rayservice" else "apps/v1"
    child = shared.api().get(api_version, kind, meta["name"], meta["namespace"])
    if child is not None and shared.owner_of((child["metadata"].get("labels")), KIND) != meta["name"]:
        child = None
    wanted = spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas
    fields, conds = statuses.endpoint_workload(kind, child, wanted)
    fields.update({"runtime": runtime, "url": builder.url(owner, spec)})
    current = body.get("status") or {}
    served = current.get("served")
    if unresolved is not None:
        conds.append(c.condition(c.REFERENCES_READY, False, unresolved.reason, unresolved.message))
        if child is None:
            conds = [x for x in conds if x["type"] not in (c.READY, c.PROGRESSING)]
            conds += [c.condition(c.READY, False, unresolved.reason, unresolved.message),
                      c.condition(c.PROGRESSING, unresolved.reason in (c.WAITING_FOR_FINE_TUNE_JOB,
                                                                      c.WAITING_FOR_VECTOR_INDEX),
                                  unresolved.reason, unresolved.message)]
            fields["phase"] = "Pending" if unresolved.reason.startswith("Waiting") else "Degraded"
        else:
            # The endpoint keeps serving what it served; the new reference is not rolled out yet.
            conds = [x for x in conds if x["type"] != c.PROGRESSING]
            conds.append(c.condition(c.PROGRESSING, unresolved.reason.startswith("Waiting"), unresolved.reason,
                                     unresolved.message))
    else:
        conds.append(c.condition(c.REFERENCES_READY, True, c.REFERENCES_RESOLVED, "references are Ready"))
        rolled_out = child is not None and not c.is_true(conds, c.PROGRESSING) and c.is_true(conds, c.AVAILABLE)
        if desired and (rolled_out or not served):
            served = {k: v for k, v in desired.items() if v is not None}
    if served:
        fields["served"] = served
    shared.write_status(PLURAL, body, fields, conds)


def refresh_by_name(namespace: str, name: str) -> None:
    body = shared.api().get_custom(PLURAL, name, namespace)
    if body is not None:
        reconcile(body)


@kopf.on.event("apps", "v1", "deployments", labels={"ragtune.io/hybridendpoint": kopf.PRESENT})
def deployment_changed(namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    if type is not None:
        refresh_by_name(namespace, labels["ragtune.io/hybridendpoint"])


@kopf.on.event("ray.io", "v1", "rayservices", labels={"ragtune.io/hybridendpoint": kopf.PRESENT})
def rayservice_changed(namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    if type is not None:
        refresh_by_name(namespace, labels["ragtune.io/hybridendpoint"])


def _referencing(index: kopf.Index, namespace: str, kind: str, name: str) -> set[str]:
    return set(index.get((namespace, kind, name), []))


@kopf.on.event(GROUP, VERSION, "finetunejobs")
def finetunejob_changed(namespace: str, name: str, type: str | None, endpoint_references: kopf.Index,
                        **_: Any) -> None:
    if type is not None:
        for endpoint in _referencing(endpoint_references, namespace, "FineTuneJob", name):
            refresh_by_name(namespace, endpoint)


@kopf.on.event(GROUP, VERSION, "vectorindexes")
def vectorindex_changed(namespace: str, name: str, type: str | None, endpoint_references: kopf.Index,
                        **_: Any) -> None:
    if type is not None:
        for endpoint in _referencing(endpoint_references, namespace, "VectorIndex", name):
            refresh_by_name(namespace, endpoint)
