"""The typed contract between the operator and the workloads.

The operator renders one of these configs into a ConfigMap mounted at /etc/ragtune/config.json; the workload
program (`python -m ragtune_workloads.<name> --config FILE`) parses it with the same class. Paths are inside the
workload's container; the operator mounts volumes there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel
from .finetunejob import FineTuneJobSpec
from .hybridendpoint import HybridEndpointSpec
from .vectorindex import VectorIndexSpec

CONFIG_MOUNT = "/etc/ragtune"
CONFIG_FILE = "config.json"
PROGRESS_ANNOTATION = "ragtune.io/progress"
RESULT_ANNOTATION = "ragtune.io/result"
# Where a workload copies a base model in S3 (model.source s3): the pod's scratch volume.
MODEL_STAGING = "/tmp/ragtune-model"


class OwnerInfo(ApiModel):
    """Which custom resource this run belongs to."""

    kind: str
    name: str
    namespace: str
    uid: str = ""
    generation: int = 0


class FineTuneConfig(ApiModel):
    kind: Literal["FineTuneConfig"] = "FineTuneConfig"
    owner: OwnerInfo
    spec: FineTuneJobSpec
    model_path: str | None = Field(default=None, description="Local directory of the base model (pvc/s3 sources); "
                                   "the hub id in spec.model.name is used when empty.")
    dataset_path: str | None = Field(default=None, description="File or directory holding the rows "
                                     "(configMap/pvc/s3 sources); inline rows come from the spec.")
    output_path: str = Field(description="Directory the adapter, checkpoints and metadata are written to.")


class IndexConfig(ApiModel):
    kind: Literal["IndexConfig"] = "IndexConfig"
    owner: OwnerInfo
    spec: VectorIndexSpec
    source_paths: list[str | None] = Field(default_factory=list, description="Local path of each spec.sources[] "
                                           "entry (pvc/configMap mounts, s3 staging); None for inline sources.")
    model_path: str | None = Field(default=None, description="Local directory of the embedding model.")
    store_uri: str = Field(description="Milvus URI: a milvus-lite file path or a server URL.")
    collection: str = Field(description="Alias readers query; versions are <collection>_v<N>.")
    state_path: str | None = Field(default=None, description="Directory for manifests of what was indexed.")


class AdapterRef(ApiModel):
    name: str
    path: str = Field(description="A directory in the pod, file://, hf://<id>, or s3://bucket/folder (copied into "
                      "the pod when it starts).")
    digest: str | None = None
    base_model: str | None = None
    s3_endpoint: str | None = Field(default=None, description="The S3 endpoint of an s3:// path; AWS when empty.")


class RetrievalTarget(ApiModel):
    store_uri: str
    collection: str
    embedding_model: str
    model_path: str | None = None
    query_prefix: str = Field(default="", max_length=256, description="Prepended to queries before embedding; "
                              "must match the VectorIndex's embedding.queryPrefix (e.g. for bge/e5 models).")
    query_backend: Literal["onnx", "openvino", "torch"] = "onnx"  # HybridEndpoint spec.retrieval.queryBackend
    query_precision: Literal["fp32", "bf16", "int8"] = "fp32"  # and its queryPrecision


class ServeConfig(ApiModel):
    kind: Literal["ServeConfig"] = "ServeConfig"
    owner: OwnerInfo
    spec: HybridEndpointSpec
    model_path: str | None = None
    adapter: AdapterRef | None = None
    retrieval: RetrievalTarget | None = None
    api_key_file: str | None = None
