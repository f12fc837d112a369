"""VectorIndex: documents loaded, chunked, embedded and written to Milvus, incrementally."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import (
    ApiModel, Condition, PvcLocation, ResourcesSpec, S3Location, SecretKeyRef, cel, precision_rules, validations,
)

DEFAULT_EMBEDDING_MODEL = "BAAI/bge-small-en-v1.5"
DocumentFormat = Literal["txt", "md", "pdf", "html"]


class InlineDocument(ApiModel):
    """A document given in the spec."""

    name: str = Field(min_length=1, max_length=253, description="Document path used in sources, e.g. faq.md.")
    text: str = Field(max_length=1_000_000, description="The document's content (markdown, text or HTML).")


class SourceSpec(ApiModel):
    """Where documents come from: one of pvc, configMap, s3 or inline."""

    model_config = validations(
        cel("[has(self.pvc), has(self.configMap), has(self.s3), has(self.inline)].filter(x, x).size() == 1",
            "each sources[] entry sets exactly one of pvc, configMap, s3 or inline"),
    )
    pvc: PvcLocation | None = None
    config_map: str | None = Field(default=None, description="ConfigMap whose keys are documents.")
    s3: S3Location | None = None
    inline: list[InlineDocument] | None = Field(default=None, max_length=500, description="Documents given in the "
                                                "spec.")
    glob: str = Field(default="**/*", description="Which files of a pvc or s3 source to load.")


class ChunkingSpec(ApiModel):
    """How documents are cut into the chunks that are embedded and retrieved."""

    model_config = validations(
        cel("self.overlap < self.size", "chunking.overlap must be smaller than chunking.size"),
    )
    strategy: Literal["tokens", "markdown"] = Field(
        default="markdown", description="tokens: fixed windows of embedding-model tokens; markdown: split at headings "
        "first, then by tokens.")
    size: int = Field(default=256, ge=16, le=8192, description="Chunk size in embedding-model tokens.")
    overlap: int = Field(default=32, ge=0, le=4096, description="Tokens shared by consecutive chunks.")


class EmbeddingSpec(ApiModel):
    """The sentence-transformers model that embeds chunks (and, at the endpoint, queries)."""

    model_config = validations(*precision_rules("embedding", "backend", "precision"))

    model: str = Field(default=DEFAULT_EMBEDDING_MODEL, min_length=1, max_length=512, description="Model id on "
                       "the hub, or a label for a model loaded from pvc.")
    source: Literal["hf", "pvc"] = Field(default="hf", description="Where the weights come from.")
    pvc: PvcLocation | None = None
    batch_size: int = Field(default=64, ge=1, le=4096, description="Chunks embedded per batch.")
    normalize: bool = Field(default=True, description="Unit-length vectors (cosine and inner product agree).")
    backend: Literal["torch", "onnx", "openvino"] = Field(
        default="torch", description="Runtime of the embedding model. onnx and openvino export the same weights "
        "once and run the export in onnxruntime or the OpenVINO runtime (the same vectors to float rounding in "
        "fp32).")
    precision: Literal["fp32", "bf16", "int8"] = Field(
        default="fp32", description="Arithmetic of the embedding model. bf16 (torch, openvino): about 2.5x faster on CPUs "
        "with AMX or AVX-512 BF16 and on GPUs, vectors within cosine 0.9999 of fp32. int8 (onnx): int8 weights, "
        "about 1.5x faster than fp32 onnx on AVX-512 VNNI CPUs, vectors within cosine 0.99 — check recall on "
        "your data. Changing it embeds every chunk again.")
    query_prefix: str = Field(default="", max_length=256, description="Prepended to queries (e.g. for bge/e5).")
    context: Literal["title", "none"] = Field(
        default="title", description="What each chunk is embedded with (the stored text is the chunk alone). title: "
        "'title: <document title>' before the chunk, so a chunk from the middle of a document still says what "
        "it is about (+1.4 points recall@10 on Cranfield); none: the chunk alone.")


class StoreSpec(ApiModel):
    """The Milvus the vectors are written to: embedded milvus-lite on a volume, or a Milvus server."""

    model_config = validations(
        cel("self.backend != 'milvus' || has(self.uri)", "store.uri is required when store.backend is milvus: set "
            "it to the server, e.g. http://milvus.milvus:19530"),
        cel("self.backend != 'milvus-lite' || !(self.indexType in ['IVF_PQ', 'DISKANN', 'SCANN'])",
            "store.indexType is not supported by milvus-lite: use FLAT, AUTOINDEX, HNSW, HNSW_SQ, IVF_FLAT or IVF_SQ8"),
    )
    backend: Literal["milvus-lite", "milvus"] = Field(default="milvus-lite", description="milvus-lite: a database "
                                                      "file on a volume; milvus: a server at uri.")
    uri: str | None = Field(default=None, pattern=r"^(https?|tcp)://.+$", description="The Milvus server, e.g. "
                            "http://milvus.milvus:19530.")
    token_secret: SecretKeyRef | None = Field(default=None, description="Secret key with the Milvus token "
                                              "(user:password or API key).")
    pvc: PvcLocation | None = Field(default=None, description="milvus-lite: the volume holding the database; "
                                    "when empty the operator creates the claim <name>-store.")
    storage_size: str = Field(default="1Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Mi|Gi|Ti)$",
                              description="Size of the claim the operator creates for milvus-lite.")
    storage_class_name: str | None = Field(default=None, description="Storage class of that claim.")
    collection: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$",
                                   description="Alias readers use; defaults to <namespace>_<name>.")
    index_type: Literal["FLAT", "AUTOINDEX", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "DISKANN",
                        "SCANN"] = Field(default="AUTOINDEX", description="Milvus index type of each version.")
    metric: Literal["COSINE", "IP", "L2"] = Field(default="COSINE", description="Similarity of query and chunk.")
    retain_versions: int = Field(default=2, ge=1, le=20, description="Collection versions kept after a rebuild.")


class VectorIndexSpec(ApiModel):
    model_config = validations(
        cel("!has(self.schedule) || self.schedule in ['@yearly', '@annually', '@monthly', '@weekly', '@daily', "
            "'@midnight', '@hourly'] || self.schedule.split(' ').size() == 5",
            "schedule must be a 5-field cron expression, e.g. '0 3 * * *', or a macro such as @daily or @hourly",
            ".schedule"),
    )
    sources: list[SourceSpec] = Field(min_length=1, max_length=32, description="Where the documents come from.")
    formats: list[DocumentFormat] = Field(default_factory=lambda: ["txt", "md", "pdf", "html"], min_length=1,
                                          description="File types loaded; others are skipped.")
    chunking: ChunkingSpec = Field(default_factory=ChunkingSpec)
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    schedule: str | None = Field(default=None, max_length=128, description="Cron schedule for refreshes.")
    suspend: bool = Field(default=False, description="Pauses scheduled refreshes.")
    deletion_policy: Literal["Retain", "Delete"] = Field(default="Retain", description="Delete drops the collection "
                                                         "on a Milvus server when the VectorIndex is deleted.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    backoff_limit: int = Field(default=2, ge=0, le=20, description="Retries of an indexing Job.")
    active_deadline_seconds: int | None = Field(default=None, ge=60, description="Fails an indexing Job after "
                                                "this long.")
    image: str | None = Field(default=None, description="Overrides the operator's indexing image.")


class IndexStats(ApiModel):
    model_config = {"extra": "ignore"}
    documents: int = 0
    documents_total: int = 0
    chunks: int = 0
    chunks_total: int = 0
    added: int = 0
    kept: int = 0
    removed: int = 0
    embedded: int = Field(default=0, description="Chunks embedded in this run; the others reused their vectors.")
    skipped: int = 0


class SkippedFile(ApiModel):
    model_config = {"extra": "ignore"}
    path: str
    reason: str


class VectorIndexStatus(ApiModel):
    model_config = {"extra": "ignore"}
    phase: str | None = None
    job_name: str | None = None
    documents: int | None = None
    chunks: int | None = None
    dimension: int | None = None
    embedding_model: str | None = None
    active_collection: str | None = None
    active_version: str | None = None
    progress: IndexStats | None = None
    progress_text: str | None = None
    skipped_files: list[SkippedFile] | None = Field(default=None, description="Files the last run could not "
                                                    "use, with the reason (the first 20).")
    last_run_time: str | None = None
    last_duration_seconds: float | None = None
    next_run_time: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class VectorIndex(ApiModel):
    model_config = {"extra": "ignore"}
    spec: VectorIndexSpec
    status: VectorIndexStatus = Field(default_factory=VectorIndexStatus)
