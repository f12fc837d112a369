"""Renders the CustomResourceDefinitions from the pydantic models (`make manifests`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel

from .. import GROUP, VERSION
from ..conditions import MESSAGE_LIMIT
from .finetunejob import FineTuneJobSpec, FineTuneJobStatus
from .hybridendpoint import HybridEndpointSpec, HybridEndpointStatus
from .vectorindex import VectorIndexSpec, VectorIndexStatus

# metav1.Condition's own validation of a condition's type and reason
CONDITION_TYPE_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                          r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    short_name: str
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    scale: dict[str, str] | None = None  # the scale subresource's paths, for a kind with replicas

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"


def _ready_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Reason", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
    ]


KINDS: list[Kind] = [
    Kind("FineTuneJob", "finetunejobs", "ftj", FineTuneJobSpec, FineTuneJobStatus,
         "LoRA/QLoRA fine-tuning of a base model into an adapter with a digest.", [
        *_ready_columns(),
        {"name": "Progress", "type": "string", "jsonPath": ".status.progressText"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1},
        {"name": "Base", "type": "string", "jsonPath": ".spec.model.name", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]),
    Kind("VectorIndex", "vectorindexes", "vix", VectorIndexSpec, VectorIndexStatus,
         "Documents chunked, embedded and written to Milvus, incrementally and with zero-downtime swaps.", [
        *_ready_columns(),
        {"name": "Progress", "type": "string", "jsonPath": ".status.progressText"},
        {"name": "Chunks", "type": "integer", "jsonPath": ".status.chunks"},
        {"name": "Version", "type": "string", "jsonPath": ".status.activeVersion", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]),
    Kind("HybridEndpoint", "hybridendpoints", "hep", HybridEndpointSpec, HybridEndpointStatus,
         "An OpenAI-compatible Ray Serve endpoint that retrieves from a VectorIndex and serves a fine-tuned adapter.", [
        *_ready_columns(),
        {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
        {"name": "Replicas", "type": "string", "jsonPath": ".status.readyReplicas"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1},
        # what a promotion changed, with -o wide: the adapter and index version actually served
        {"name": "Adapter", "type": "string", "jsonPath": ".status.served.adapter", "priority": 1},
        {"name": "Index", "type": "string", "jsonPath": ".status.served.indexVersion", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ], scale={"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
              "labelSelectorPath": ".status.selector"}),
]
KINDS_BY_NAME = {k.kind: k for k in KINDS}

# JSON-schema keywords that structural OpenAPI v3 schemas in a CRD accept.
_ALLOWED = {
    "type", "description", "properties", "items", "required", "enum", "default", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "additionalProperties", "nullable",
    "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema turned structural: $refs inlined, optionals flattened, defaults kept."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _convert(raw, defs)
    _fill_object_defaults(model, schema)
    return schema


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_class(arg)
        if found is not None and get_origin(annotation) is not list:
            return found
    return None


def _fill_object_defaults(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """A nested object whose field has a default (factory) gets that default, fully spelled out, so the API
    server fills it in, CEL rules see complete objects, and kubectl/GitOps users see every default."""
    for name, info in model.model_fields.items():
        prop = schema.get("properties", {}).get(info.alias or name)
        sub = _model_class(info.annotation)
        if prop is None or sub is None:
            continue
        if prop.get("type") == "object":
            _fill_object_defaults(sub, prop)
        elif prop.get("type") == "array" and prop.get("items", {}).get("type") == "object":
            _fill_object_defaults(sub, prop["items"])
        if info.default_factory is not None and prop.get("type") == "object":
            prop["default"] = info.default_factory().model_dump(by_alias=True, exclude_none=True, mode="json")


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **node}
        return _convert(merged, defs)
    if "anyOf" in node:
        variants = [v for v in node.pop("anyOf") if v.get("type") != "null"]
        if len(variants) != 1:
            raise ValueError(f"union types cannot become a structural schema: {variants}")
        inner = _convert(variants[0], defs)
        for key in ("description", "default"):
            if key in node and node[key] is not None:
                inner[key] = node[key]
        node = {**node, **inner}
        if node.get("default", 0) is None:
            node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("exclusiveMinimum") is not None and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if node.get("exclusiveMaximum") is not None and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True

    if "properties" in node:
        node["type"] = "object"
        node["properties"] = {name: _convert(prop, defs) for name, prop in node["properties"].items()}
        if node.get("additionalProperties") is False:
            node.pop("additionalProperties")
    elif node.get("type") == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            node["additionalProperties"] = _convert(extra, defs)
        else:
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
    elif node.get("type") is None and not node.get("enum"):
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in node:
        node["items"] = _convert(node["items"], defs)
    return {k: v for k, v in node.items() if k in _ALLOWED}


def _drop_defaults(schema: dict[str, Any]) -> dict[str, Any]:
    """Status is written by the operator only: no defaults there, and unknown fields are tolerated."""
    schema = {k: v for k, v in schema.items() if k not in ("default", "x-kubernetes-validations")}
    if "properties" in schema:
        schema["properties"] = {n: _drop_defaults(p) for n, p in schema["properties"].items()}
    if "items" in schema:
        schema["items"] = _drop_defaults(schema["items"])
    return schema


def crd(kind: Kind) -> dict[str, Any]:
    spec_schema = structural_schema(kind.spec)
    status_schema = _drop_defaults(structural_schema(kind.status))
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    conditions = (status_schema.get("properties") or {}).get("conditions")
    if conditions:  # API conventions: a list keyed by type, as kubectl and server-side apply expect
        conditions["x-kubernetes-list-type"] = "map"
        conditions["x-kubernetes-list-map-keys"] = ["type"]
        # and each item as metav1.Condition validates it
        item = conditions["items"]
        item["required"] = ["type", "status", "lastTransitionTime", "reason", "message"]
        fields = item["properties"]
        fields["type"].update(maxLength=316, pattern=CONDITION_TYPE_PATTERN)
        fields["reason"].update(minLength=1, maxLength=1024, pattern=CONDITION_REASON_PATTERN)
        fields["message"]["maxLength"] = MESSAGE_LIMIT
        fields["lastTransitionTime"]["format"] = "date-time"
        fields["observedGeneration"]["minimum"] = 0
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": kind.crd_name, "labels": {"app.kubernetes.io/part-of": "ragtune"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": [kind.short_name],
                "categories": ["ragtune"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}, **({"scale": kind.scale} if kind.scale else {})},
                "additionalPrinterColumns": kind.printer_columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": kind.description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema,
                    },
                }},
            }],
        },
    }


def peering_crds() -> list[dict[str, Any]]:
    """kopf's peering resources: with them installed, operator replicas elect one active instance (HA);
    without them each replica runs standalone."""
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    crds = []
    for kind, plural, scope in (("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
                                ("KopfPeering", "kopfpeerings", "Namespaced")):
        crds.append({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.kopf.dev", "labels": {"app.kubernetes.io/part-of": "ragtune"}},
            "spec": {"group": "kopf.dev", "scope": scope,
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                     "versions": [{"name": "v1", "served": True, "storage": True, "schema": schema}]},
        })
    return crds


def render_all() -> dict[str, str]:
    """File name → YAML text of each CRD."""
    header = "# Generated by `make manifests` from operator/ragtune/api; do not edit.\n"
    files = {
        f"{GROUP}_{k.plural}.yaml": header + yaml.safe_dump(crd(k), sort_keys=False, width=120)
        for k in KINDS
    }
    files["kopf.dev_peerings.yaml"] = header + yaml.safe_dump_all(peering_crds(), sort_keys=False, width=120)
    return files
