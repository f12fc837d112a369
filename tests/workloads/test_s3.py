"""s3 locations against a real S3 server (hack/s3server) with the real client: index sources, training rows and
the fine-tuned adapter's upload, and the failures a user sees for a wrong bucket, wrong credentials or an empty
folder."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from conftest import MODEL_NAME, RecordingReporter, index_config
from conftest_finetune import (  # noqa: F401  (tiny_model is a fixture)
    ROWS, fast_training, make_config, run_workload, tiny_model,
)
from ragtune.api.finetunejob import DatasetSpec
from ragtune.api.vectorindex import SourceSpec
from ragtune_workloads.finetune import artifacts
from ragtune_workloads.finetune.data import load_examples, read_rows
from ragtune_workloads.finetune.errors import ConfigError, DatasetError
from ragtune_workloads.index.loaders import load_sources
from ragtune_workloads.index.pipeline import run_index
from ragtune_workloads.index.retrieval import Retriever
from ragtune_workloads.s3 import S3LocationError, endpoint_address, s3_client, s3_folder

ALL_FORMATS = ("txt", "md", "pdf", "html")


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def s3_source(s3, bucket: str, path: str, glob: str = "**/*") -> SourceSpec:
    return SourceSpec(s3={"uri": f"s3://{bucket}/{path}", "endpoint": s3.endpoint}, glob=glob)


# ---------------------------------------------------------------- the client

def test_an_s3_path_is_a_folder_not_a_key_prefix():
    assert s3_folder("s3://docs/manuals") == ("docs", "manuals/")  # never manuals-old/
    assert s3_folder("s3://docs/manuals/v1/") == ("docs", "manuals/v1/")
    assert s3_folder("s3://docs") == ("docs", "")
    assert s3_folder("s3://docs/") == ("docs", "")


@pytest.mark.parametrize("endpoint, address", [
    (None, ("s3.amazonaws.com", True)),
    ("https://s3.eu-central-1.amazonaws.com", ("s3.eu-central-1.amazonaws.com", True)),
    ("http://minio.storage:9000", ("minio.storage:9000", False)),
    ("http://minio.storage:9000/", ("minio.storage:9000", False)),
    ("minio.storage:9000", ("minio.storage:9000", True)),
])
def test_endpoint_urls_give_the_host_and_whether_to_use_tls(endpoint, address):
    assert endpoint_address(endpoint) == address


@pytest.mark.parametrize("endpoint, reason", [
    ("ftp://files.example.com", "is not an http(s) URL"),
    ("http://minio.storage:9000/bucket", "has a path"),
])
def test_unusable_endpoints_are_refused_naming_the_field(endpoint, reason):
    with pytest.raises(S3LocationError, match="^" + re.escape(f"dataset.s3.endpoint '{endpoint}' {reason}")):
        endpoint_address(endpoint, "dataset.s3")


def test_half_a_credentials_secret_is_refused(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(S3LocationError, match="output.s3.credentialsSecret gives AWS_ACCESS_KEY_ID but not "
                                              "AWS_SECRET_ACCESS_KEY"):
        s3_client("http://127.0.0.1:9", "output.s3")


def test_an_image_without_minio_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "minio", None)  # an image built without it
    with pytest.raises(S3LocationError, match=r"^sources\[0\]\.s3 needs the minio package"):
        s3_client(None, "sources[0].s3")


# ---------------------------------------------------------------- index sources

def test_index_run_reads_an_s3_folder_through_its_glob(s3, tmp_path, embedder, model_path):
    bucket = s3.new_bucket()
    s3.put(bucket, {
        "manuals/guide/setup.md": b"# Setup\n\nBolt the wing to the spar and torque it to 40 Nm.\n",
        "manuals/flaps.md": b"# Flaps\n\nCheck the flaps before every flight.\n",
        "manuals/empty.md": b"",
        "manuals/notes.txt": b"Outside the glob: never copied.\n",
        "manuals-old/stale.md": b"# Stale\n\nA sibling folder, never listed.\n",
    })
    config = index_config(tmp_path / "staging", tmp_path / "store", model_path, collection="manuals",
                          spec={"sources": [{"s3": {"uri": f"s3://{bucket}/manuals", "endpoint": s3.endpoint},
                                             "glob": "**/*.md"}]})

    result = run_index(config, RecordingReporter(), embedder=embedder)

    assert result["documents"] == 2 and result["embeddingModel"] == MODEL_NAME
    assert result["skipped"] == [{"path": f"s3://{bucket}/manuals/empty.md", "reason": "empty file"}]
    staged = sorted(p.relative_to(tmp_path / "staging").as_posix() for p in (tmp_path / "staging").rglob("*")
                    if p.is_file())
    assert staged == ["empty.md", "flaps.md", "guide/setup.md"]
    with Retriever(config.store_uri, config.collection, embedder) as retriever:
        hit = retriever.search("how tight is the wing bolt", k=1)[0]
    assert hit.metadata["path"] == f"s3://{bucket}/manuals/guide/setup.md"
    assert hit.metadata["title"] == "Setup" and "40 Nm" in hit.text


def test_index_source_on_an_empty_s3_folder_fails_the_run(s3, tmp_path):
    bucket = s3.new_bucket()
    s3.put(bucket, {"manuals-old/a.md": b"# A\n\nalpha"})  # s3://bucket/manuals itself holds nothing
    with pytest.raises(S3LocationError, match=rf"^sources\[0\]\.s3\.uri s3://{bucket}/manuals: no objects under "
                                              "that folder"):
        load_sources([s3_source(s3, bucket, "manuals")], [str(tmp_path / "staging")], ALL_FORMATS)


def test_index_source_in_a_missing_bucket_names_the_bucket_and_the_fix(s3, tmp_path):
    with pytest.raises(S3LocationError) as failure:
        load_sources([s3_source(s3, "no-such-bucket", "manuals")], [str(tmp_path / "staging")], ALL_FORMATS)
    assert str(failure.value) == (f"sources[0].s3.uri s3://no-such-bucket/manuals: bucket 'no-such-bucket' does "
                                  f"not exist on {s3.endpoint}; create it or correct the bucket name")


@pytest.mark.parametrize("access_key, secret_key, reason", [
    ("ragtune-test", "not-the-secret", "refused the secret key (AWS_SECRET_ACCESS_KEY in "
                                       "sources[0].s3.credentialsSecret): it does not match the access key"),
    ("nobody", "ragtune-test-secret", "does not know the access key (AWS_ACCESS_KEY_ID in "
                                      "sources[0].s3.credentialsSecret)"),
    (None, None, "denied anonymous access to s3://{bucket}/manuals; set sources[0].s3.credentialsSecret"),
], ids=["wrong-secret", "unknown-key", "no-credentials"])
def test_refused_credentials_say_which_key_is_wrong(s3, tmp_path, monkeypatch, access_key, secret_key, reason):
    bucket = s3.new_bucket()
    s3.put(bucket, {"manuals/a.md": b"# A\n\nalpha"})
    for name, value in (("AWS_ACCESS_KEY_ID", access_key), ("AWS_SECRET_ACCESS_KEY", secret_key)):
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(S3LocationError) as failure:
        load_sources([s3_source(s3, bucket, "manuals")], [str(tmp_path / "staging")], ALL_FORMATS)
    assert str(failure.value).startswith(f"sources[0].s3: {s3.endpoint} {reason.format(bucket=bucket)}")
    assert not any((tmp_path / "staging").rglob("*.md"))


# ---------------------------------------------------------------- training rows

def s3_dataset(s3, bucket: str, path: str, **fields) -> DatasetSpec:
    return DatasetSpec.model_validate({"source": "s3", "s3": {"uri": f"s3://{bucket}/{path}",
                                                              "endpoint": s3.endpoint},
                                       "format": "instruction", **fields})


def test_training_rows_are_read_from_every_row_file_under_an_s3_folder(s3, tmp_path):
    bucket = s3.new_bucket()
    rows = ROWS["instruction"](9)
    s3.put(bucket, {
        "rows/part-1.jsonl": jsonl(rows[:4]),
        "rows/more/part-2.json": json.dumps(rows[4:]).encode(),
        "rows/README.md": b"not rows",
        "rows-old/part-0.jsonl": jsonl(ROWS["instruction"](50)),  # a sibling folder, never read
    })
    spec = s3_dataset(s3, bucket, "rows")

    loaded = load_examples(read_rows(spec, None, tmp_path / "staging"), spec)

    assert loaded.rows_read == 9 and not loaded.skipped
    assert sorted(e.completion for e in loaded.examples) == sorted(r["output"] for r in rows)
    assert sorted(p.relative_to(tmp_path / "staging").as_posix() for p in (tmp_path / "staging").rglob("*")
                  if p.is_file()) == ["more/part-2.json", "part-1.jsonl"]


def test_an_s3_folder_without_row_files_is_refused(s3, tmp_path):
    bucket = s3.new_bucket()
    s3.put(bucket, {"rows/README.md": b"not rows"})
    with pytest.raises(DatasetError, match=rf"^dataset\.s3\.uri s3://{bucket}/rows: 1 objects under that folder, "
                                           r"none of them \.json or \.jsonl"):
        list(read_rows(s3_dataset(s3, bucket, "rows"), None, tmp_path / "staging"))


# ---------------------------------------------------------------- the fine-tuned adapter

def put_folder(s3, bucket: str, prefix: str, folder: Path) -> None:
    s3.put(bucket, {f"{prefix}/{path.relative_to(folder).as_posix()}": path.read_bytes()
                    for path in folder.rglob("*") if path.is_file()})


def test_adapter_trained_from_s3_rows_and_model_is_uploaded_to_s3(s3, tmp_path, tiny_model):
    """Rows, base model and output all in S3, with the config exactly as the operator writes it (only its two pod
    paths moved under the test's directory)."""
    from ragtune.api.finetunejob import FineTuneJobSpec
    from ragtune.api.workload import OwnerInfo
    from ragtune.builders import finetune as builder
    from ragtune_workloads.finetune.run import run
    from ragtune_workloads.reporting import Reporter

    bucket = s3.new_bucket()
    s3.put(bucket, {"rows/train.jsonl": jsonl(ROWS["instruction"](8))})
    put_folder(s3, bucket, "models/tiny", tiny_model)
    location = {"endpoint": s3.endpoint}
    spec = FineTuneJobSpec.model_validate({
        "model": {"name": "tiny-llama", "source": "s3", "s3": {"uri": f"s3://{bucket}/models/tiny", **location}},
        "dataset": {"source": "s3", "format": "instruction", "s3": {"uri": f"s3://{bucket}/rows", **location}},
        "training": fast_training(maxSteps=2, saveSteps=100),
        "output": {"s3": {"uri": f"s3://{bucket}/adapters/v1/", **location}}})
    operator_config = builder.workload_config(OwnerInfo(kind="FineTuneJob", name="test", namespace="default"), spec)
    assert operator_config.dataset_path is None and operator_config.model_path == builder.MODEL_STAGING
    staged_model = tmp_path / "scratch" / "model"
    config = operator_config.model_copy(update={"model_path": str(staged_model),
                                                "output_path": str(tmp_path / "out")})
    stale = tmp_path / "out" / ".dataset" / "left-by-an-earlier-run.jsonl"  # a retried pod's volume
    stale.parent.mkdir(parents=True)
    stale.write_bytes(jsonl(ROWS["instruction"](30)))
    reporter = Reporter(interval=0.0)
    reporter.file = str(tmp_path / "progress.json")

    result = run(config, reporter)

    assert result["uri"] == f"s3://{bucket}/adapters/v1/adapter"
    keys = s3.keys(bucket, "adapters/")
    assert {f"adapters/v1/adapter/{name}" for name in artifacts.ADAPTER_FILES} <= set(keys)
    assert "adapters/v1/metadata.json" in keys
    assert not any("/checkpoints/" in key or "/.dataset/" in key for key in keys)  # only what a server loads
    # What was uploaded is what the digest in status describes, byte for byte.
    manifest = [(key.removeprefix("adapters/v1/adapter/"), hashlib.sha256(s3.read(bucket, key)).hexdigest())
                for key in keys if key.startswith("adapters/v1/adapter/")]
    assert artifacts.manifest_digest(sorted(manifest)) == result["digest"]
    metadata = json.loads(s3.read(bucket, "adapters/v1/metadata.json"))
    assert metadata["digest"] == result["digest"] and metadata["dataset"]["rowsRead"] == 8  # none of the stale
    assert (staged_model / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()


def test_a_model_folder_without_config_json_is_refused_naming_the_uri(s3, tmp_path, tiny_model):
    from ragtune_workloads.finetune.engine import resolve_model_source
    from ragtune_workloads.finetune.errors import ModelNotFoundError

    bucket = s3.new_bucket()
    s3.put(bucket, {"models/tiny/weights/model.safetensors": b"not a model"})
    config = make_config(tmp_path, tmp_path / "scratch", {"source": "inline", "format": "instruction",
                                                          "rows": ROWS["instruction"](4)},
                         model={"name": "tiny-llama", "source": "s3",
                                "s3": {"uri": f"s3://{bucket}/models/tiny", "endpoint": s3.endpoint}})
    with pytest.raises(ModelNotFoundError, match=rf"^model\.s3\.uri s3://{bucket}/models/tiny holds no "
                                                 r"config\.json: point it at the folder"):
        resolve_model_source(config)
    with pytest.raises(ModelNotFoundError, match=rf"^model\.s3\.uri s3://{bucket}/empty: no objects under that "
                                                 r"folder"):
        resolve_model_source(config.model_copy(update={"spec": config.spec.model_copy(update={
            "model": config.spec.model.model_copy(update={"s3": config.spec.model.s3.model_copy(
                update={"uri": f"s3://{bucket}/empty"})})})}))


def test_a_missing_output_bucket_is_refused_before_training(s3, tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, {"source": "inline", "format": "instruction",
                                                "rows": ROWS["instruction"](4)},
                         output={"pvc": None, "s3": {"uri": "s3://no-such-bucket/adapters", "endpoint": s3.endpoint}})
    with pytest.raises(ConfigError, match=r"^output\.s3\.uri s3://no-such-bucket/adapters: bucket 'no-such-bucket' "
                                          "does not exist"):
        artifacts.s3_preflight(config.spec.output.s3)

    completed = run_workload(tmp_path, config)  # the program, as the operator runs it

    assert completed.returncode == ConfigError.exit_code
    assert completed.stderr.strip().splitlines()[-1] == (
        f"finetune failed: output.s3.uri s3://no-such-bucket/adapters: bucket 'no-such-bucket' does not exist on "
        f"{s3.endpoint}; create it or correct the bucket name")
    assert not (Path(config.output_path) / artifacts.ADAPTER_DIR).exists()


def test_an_endpoint_nothing_listens_on_is_named_in_the_failure(s3, tmp_path):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago, and nothing listens on now
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    source = SourceSpec(s3={"uri": "s3://manuals/docs", "endpoint": endpoint})
    with pytest.raises(S3LocationError, match=rf"^sources\[0\]\.s3: cannot reach {endpoint}: .*refused.*; check "
                                              r"sources\[0\]\.s3\.endpoint"):
        load_sources([source], [str(tmp_path / "staging")], ALL_FORMATS)


# ---------------------------------------------------------------- an endpoint's model and adapter

def test_an_endpoint_serves_its_model_and_a_fine_tuned_adapter_from_s3(s3, tmp_path, monkeypatch):
    """The base model (model.s3) and a FineTuneJob's adapter uploaded to output.s3 are copied into the pod, the
    adapter checked against its digest, and the adapter answers; a changed adapter is refused."""
    import asyncio

    import serve_fixtures as fx
    from ragtune.api.workload import ServeConfig
    from ragtune_workloads.serve import config as serve_config
    from ragtune_workloads.serve.app import Generation
    from ragtune_workloads.serve.config import ConfigError, stage_files

    model, adapter = fx.tiny_model_path(), fx.adapter_path()
    bucket = s3.new_bucket()
    put_folder(s3, bucket, "models/tiny", model)
    put_folder(s3, bucket, "adapters/ft/adapter", adapter)
    monkeypatch.setattr(serve_config, "ADAPTER_STAGING", str(tmp_path / "scratch" / "adapters"))
    raw = json.loads(fx.serve_config(tmp_path / "serve.json", name="ep", mode="finetuned", model=model,
                                     adapter=adapter, store=None, engine="transformers").read_text())
    raw["spec"]["model"].update(source="s3", s3={"uri": f"s3://{bucket}/models/tiny", "endpoint": s3.endpoint})
    raw["modelPath"] = str(tmp_path / "scratch" / "model")
    raw["adapter"] = {"name": "ft", "path": f"s3://{bucket}/adapters/ft/adapter", "baseModel": "tiny-llama",
                      "digest": artifacts.tree_digest(adapter), "s3Endpoint": s3.endpoint}
    config = ServeConfig.model_validate(raw)

    staged = stage_files(config)
    assert staged.model_path == raw["modelPath"] and staged.adapter.path == str(tmp_path / "scratch/adapters/ft")
    generation = Generation(config)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(staged.model_path)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is a boundary layer?"}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        params = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "stop": (), "seed": None,
                  "presence_penalty": 0.0, "frequency_penalty": 0.0}
        answer = asyncio.run(generation.generate(list(prompt), params, True))
        assert fx.speaks_like_adapter(answer["text"]), answer
    finally:
        generation.engine.close()

    s3.put(bucket, {"adapters/ft2/adapter/adapter_config.json": b"{}"})
    changed = config.model_copy(update={"adapter": config.adapter.model_copy(
        update={"name": "ft2", "path": f"s3://{bucket}/adapters/ft2/adapter"})})
    with pytest.raises(ConfigError, match=r"^adapter ft2 at .* has digest sha256:\w+, expected "):
        Generation(changed)
