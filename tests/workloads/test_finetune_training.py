"""The fine-tuning workload end to end on the tiny Llama: real training with trl + peft on CPU, the artifacts a
server loads, evaluation, progress, failures as the operator sees them, and resuming a killed run."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest_finetune import (  # noqa: F401  (tiny_model is a fixture)
    ROOT, ROWS, fast_training, make_config, read_progress, read_result, run_workload, tiny_model, workload_command,
    workload_env, write_config, write_json_array, write_jsonl,
)
from ragtune.api.finetunejob import Artifact
from ragtune_workloads.finetune.data import load_examples, read_rows
from ragtune_workloads.finetune.data import dataset_digest as digest_of_rows
from ragtune_workloads.finetune.trainers import is_complete_checkpoint

ROW_COUNT = 24
PROBE = "add 5 and 8"


def train_in_process(tmp_path: Path, config) -> dict:
    from ragtune_workloads.finetune.run import run
    from ragtune_workloads.reporting import Reporter

    reporter = Reporter(interval=0.0)
    reporter.file = str(tmp_path / "progress.json")
    return run(config, reporter)


def format_config(tmp_path: Path, model: Path, fmt: str):
    """One run per format, each from a different source, with the options the tests below look at."""
    rows = ROWS[fmt](ROW_COUNT)
    if fmt == "instruction":  # a ConfigMap mount, JSON Lines, merged model asked for
        write_jsonl(tmp_path / "cm" / "train.jsonl", rows)
        return make_config(tmp_path, model, {"source": "configMap", "configMap": {"name": "rows"}, "format": fmt,
                                             "validationSplit": 0.25},
                           dataset_path=tmp_path / "cm", output={"merge": True})
    if fmt == "prompt-completion":  # a PVC file, a JSON array, an eval-loss threshold no tiny run can meet
        path = write_json_array(tmp_path / "pvc" / "data" / "train.json", rows)
        return make_config(tmp_path, model, {"source": "pvc", "pvc": {"claimName": "data", "path": "data"},
                                             "format": fmt, "validationSplit": 0.25},
                           dataset_path=path, evaluation={"maxEvalLoss": 0.01})
    # Inline, with one bad row that the spec says to skip.
    rows.insert(5, {"messages": [{"role": "user", "content": "no answer"}]})
    return make_config(tmp_path, model, {"source": "inline", "format": fmt, "rows": rows, "validationSplit": 0.25,
                                         "onBadRow": "skip"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """format -> (config, result, output directory); trained once for the whole module."""
    trained = {}
    for fmt in ("instruction", "prompt-completion", "chat"):
        tmp_path = tmp_path_factory.mktemp(fmt)
        config = format_config(tmp_path, tiny_model, fmt)
        trained[fmt] = (config, train_in_process(tmp_path, config), Path(config.output_path), tmp_path)
    return trained


@pytest.fixture(scope="module")
def base_model(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


def probe_logits(model, tokenizer):
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                           add_generation_prompt=True)
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits[0]


FORMATS = ["instruction", "prompt-completion", "chat"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_adapter_loads_with_peft_and_changes_the_output(runs, base_model, tiny_model, fmt):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result, output, _ = runs[fmt]
    adapter = Path(result["uri"])
    assert adapter == output / "adapter"
    # The layout vLLM and Ray Serve LLM load: the config and the weights as safetensors, nothing of the base.
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert not list(adapter.glob("*.bin")) and not (adapter / "model.safetensors").exists()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (16, 32, 0.05)
    wrapped = {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    model, tokenizer = base_model
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    difference = (probe_logits(tuned, tokenizer) - probe_logits(model, tokenizer)).abs().max().item()
    assert difference > 1e-2, "the adapter left the model's output unchanged"


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_lowers_the_loss(runs, fmt):
    _, result, output, _ = runs[fmt]
    state = json.loads((output / "checkpoints" / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_merged_model_loads_with_transformers_and_matches_the_adapter(runs, base_model, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result, output, _ = runs["instruction"]
    assert result["mergedUri"] == str(output / "merged")
    merged = AutoModelForCausalLM.from_pretrained(result["mergedUri"])
    merged_tokenizer = AutoTokenizer.from_pretrained(result["mergedUri"])
    assert merged_tokenizer.chat_template  # a server can chat with the merged model on its own
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result["uri"])
    model, tokenizer = base_model
    merged_logits = probe_logits(merged, merged_tokenizer)
    assert (merged_logits - probe_logits(adapted, tokenizer)).abs().max().item() < 1e-3
    assert (merged_logits - probe_logits(model, tokenizer)).abs().max().item() > 1e-2
    assert runs["chat"][1]["mergedUri"] is None  # only when asked for


def sha256sum_digest(directory: Path) -> str:
    """What `(cd DIR && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum) | sha256sum` prints."""
    names = sorted((p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()),
                   key=str.encode)
    listing = "".join(f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


@pytest.mark.parametrize("fmt", FORMATS)
def test_digest_matches_the_adapter_files(runs, fmt):
    _, result, output, tmp_path = runs[fmt]
    metadata = json.loads((output / "metadata.json").read_text())
    assert result["digest"] == metadata["digest"] == sha256sum_digest(Path(result["uri"]))
    assert [f["path"] for f in metadata["files"]] == sorted(p.name for p in Path(result["uri"]).iterdir())
    # The published result is what the operator parses into status.artifact.
    assert read_result(tmp_path) == result
    assert Artifact.model_validate(result).digest == result["digest"]


def test_metadata_records_model_data_config_and_metrics(runs):
    config, result, output, _ = runs["instruction"]
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["baseModel"] == result["baseModel"] == "tiny-llama"
    assert metadata["baseModelSource"] == config.model_path
    assert metadata["config"] == config.spec.to_wire()
    rows = load_examples(read_rows(config.spec.dataset, config.dataset_path), config.spec.dataset)
    assert metadata["dataset"]["digest"] == digest_of_rows(rows.examples)
    assert (metadata["dataset"]["trainRows"], metadata["dataset"]["validationRows"]) == (18, 6)
    assert metadata["merged"]["digest"] == sha256sum_digest(output / "merged")
    metrics = metadata["metrics"]
    assert metrics == result["metrics"]
    assert metrics["evalSamples"] == 6
    assert 0 < metrics["evalLoss"] < 20
    assert 0 <= metrics["exactMatch"] <= 1 and 0 <= metrics["rougeL"] <= 1 and 0 <= metrics["bleu"] <= 100
    assert metrics["trainTokensPerSecond"] > 0


def test_skipped_rows_are_counted_in_the_metadata(runs):
    dataset = json.loads((runs["chat"][2] / "metadata.json").read_text())["dataset"]
    assert (dataset["rowsRead"], dataset["skippedRows"], dataset["trainRows"] + dataset["validationRows"]) == (
        ROW_COUNT + 1, 1, ROW_COUNT)
    assert dataset["skippedReasons"] == ["inline row 6: field \"messages\" needs at least a user message and the "
                                         "assistant's answer"]


def test_thresholds_mark_the_result_not_promotable(runs):
    assert runs["instruction"][1]["promotable"] is True
    _, result, output, _ = runs["prompt-completion"]
    assert result["promotable"] is False
    reasons = json.loads((output / "metadata.json").read_text())["notPromotableReasons"]
    assert len(reasons) == 1 and "above maxEvalLoss 0.01" in reasons[0]


def test_progress_reports_steps_loss_eval_loss_and_eta(runs):
    progress = read_progress(runs["chat"][3])
    assert progress["step"] == progress["totalSteps"] == 12
    assert progress["etaSeconds"] == 0.0
    assert progress["loss"] > 0 and progress["evalLoss"] > 0 and progress["tokensPerSecond"] > 0
    assert progress["updatedAt"].endswith("Z")


def test_heartbeat_republishes_while_a_step_is_running(tmp_path):
    from ragtune_workloads.finetune.progress import Heartbeat
    from ragtune_workloads.reporting import Reporter

    reporter = Reporter(interval=0.05)
    reporter.file = str(tmp_path / "progress.json")
    snapshot = {"step": 3, "totalSteps": 10}
    with Heartbeat(reporter, lambda: dict(snapshot), every=0.02):
        time.sleep(0.2)
        snapshot["step"] = 4  # nothing else reports: only the heartbeat can carry this out
        time.sleep(0.3)
    assert read_progress(tmp_path)["step"] == 4


# ---------------------------------------------------------------- failures, as the operator sees them

def assert_failed(process: subprocess.CompletedProcess, tmp_path: Path, code: int, message: str) -> str:
    assert process.returncode == code, process.stderr[-2000:]
    last_line = process.stderr.strip().splitlines()[-1]
    assert last_line.startswith("finetune failed: ") and message in last_line, last_line
    assert (tmp_path / "termination-log").read_text() == last_line
    return last_line


def test_bad_row_fails_the_program_with_file_and_line(tmp_path, tiny_model):
    rows = ROWS["chat"](5)
    rows[3]["messages"].pop()  # the answer is missing
    write_jsonl(tmp_path / "rows" / "chat.jsonl", rows)
    config = make_config(tmp_path, tiny_model, {"source": "pvc", "pvc": {"claimName": "d"}, "format": "chat"},
                         dataset_path=tmp_path / "rows")
    process = run_workload(tmp_path, config)
    assert_failed(process, tmp_path, 3, "chat.jsonl line 4: the last message (messages[1]) must be the "
                                        "assistant's")
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available(),
                    reason="this machine has a GPU: qlora is allowed here")
def test_qlora_without_gpu_is_refused(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, {"source": "inline", "rows": ROWS["instruction"](4)},
                         method="qlora", resources={"gpu": 1})
    process = run_workload(tmp_path, config)
    assert_failed(process, tmp_path, 2, "method qlora loads the base model in 4 bits, which needs an NVIDIA GPU")


def test_missing_model_is_refused(tmp_path):
    config = make_config(tmp_path, tmp_path / "models" / "absent", {"source": "inline",
                                                                     "rows": ROWS["instruction"](4)})
    process = run_workload(tmp_path, config)
    assert_failed(process, tmp_path, 4, "models/absent holds no config.json")


def test_hub_model_unreachable_offline_is_refused(tmp_path):
    config = make_config(tmp_path, tmp_path, {"source": "inline", "rows": ROWS["instruction"](4)})
    config = config.model_copy(update={"model_path": None,
                                       "spec": config.spec.model_copy(update={"model": config.spec.model.model_copy(
                                           update={"name": "ragtune-tests/no-such-model", "source": "hf"})})})
    process = run_workload(tmp_path, config)
    assert_failed(process, tmp_path, 4, "base model ragtune-tests/no-such-model could not be loaded")


def test_gguf_export_that_cannot_run_here_fails_before_training(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, {"source": "inline", "rows": ROWS["instruction"](4)},
                         output={"gguf": {"enabled": True}})
    process = run_workload(tmp_path, config)
    if process.returncode == 0:  # an image with llama.cpp: the export must then really be there
        assert Path(read_result(tmp_path)["ggufUri"]).stat().st_size > 0
        return
    assert_failed(process, tmp_path, 5, "output.gguf needs llama.cpp's convert_hf_to_gguf.py")
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------- resumption

def wait_for_checkpoint(checkpoints: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Complete by the workload's own rule (its state file parses): a file that merely exists may still be
        # being written, and a kill then leaves a checkpoint the retry rightly refuses.
        done = [p for p in checkpoints.glob("checkpoint-*") if is_complete_checkpoint(p)]
        if done:
            return done[0]
        assert process.poll() is None, "the run ended before writing a checkpoint"
        time.sleep(0.05)
    raise AssertionError("no checkpoint within the timeout")


def test_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, {"source": "inline", "rows": ROWS["instruction"](ROW_COUNT),
                                                "validationSplit": 0.0},
                         training=fast_training(maxSteps=60, saveSteps=10))
    config_file = write_config(tmp_path / "config.json", config)
    checkpoints = tmp_path / "out" / "checkpoints"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(workload_command(config_file), env=workload_env(tmp_path), stdout=log,
                                 stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_for_checkpoint(checkpoints, first)
            first.send_signal(signal.SIGKILL)  # what a node failure or an OOM kill does: no cleanup
        finally:
            first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "metadata.json").exists()

    second = subprocess.run(workload_command(config_file), env=workload_env(tmp_path), capture_output=True,
                            text=True, timeout=180, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-2000:]
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["resumedFromStep"] >= 10
    assert f"resuming from checkpoint-{metadata['resumedFromStep']}" in second.stdout
    assert metadata["metrics"]["trainSteps"] == 60
    # The retry trained only the steps the first try had not finished.
    state = json.loads((checkpoints / "checkpoint-60" / "trainer_state.json").read_text())
    steps_logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps_logged == list(range(1, 61))
    # and its loss is the whole run's, not the retry's part of it
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert metadata["metrics"]["trainLoss"] == pytest.approx(sum(losses) / len(losses))


def test_checkpoints_of_another_finetunejob_are_not_resumed(tmp_path):
    from ragtune_workloads.finetune.artifacts import claim_checkpoints

    checkpoints = tmp_path / "out" / "checkpoints"
    assert not claim_checkpoints(checkpoints, "uid-a")          # a first run claims an empty folder
    (checkpoints / "checkpoint-12").mkdir()
    assert not claim_checkpoints(checkpoints, "uid-a")          # its retry keeps what it saved
    assert (checkpoints / "checkpoint-12").is_dir()
    assert claim_checkpoints(checkpoints, "uid-b")              # another job at the same path starts over
    assert not (checkpoints / "checkpoint-12").exists() and (checkpoints / "owner").read_text() == "uid-b\n"


# ---------------------------------------------------------------- NVIDIA GPU path

def gpu_skip_reason(needs_unsloth: bool) -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU; this machine has none"
    if needs_unsloth and importlib.util.find_spec("unsloth") is None:
        return "needs unsloth, which only the GPU image installs (workloads/requirements-gpu.txt)"
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_unsloth_trains_on_the_gpu(tmp_path, tiny_model, method):
    reason = gpu_skip_reason(needs_unsloth=True)
    if reason:
        pytest.skip(reason)
    config = make_config(tmp_path, tiny_model, {"source": "inline", "rows": ROWS["chat"](ROW_COUNT),
                                                "format": "chat", "validationSplit": 0.25},
                         method=method, resources={"gpu": 1})
    result = train_in_process(tmp_path, config)
    metadata = json.loads((Path(config.output_path) / "metadata.json").read_text())
    assert metadata["engine"] == "unsloth" and metadata["hardware"]["nvidiaGpu"] is True
    assert (Path(result["uri"]) / "adapter_model.safetensors").is_file()
    assert result["digest"] == sha256sum_digest(Path(result["uri"]))


@pytest.mark.gpu
def test_trl_trains_on_the_gpu_in_16_bits(tmp_path, tiny_model):
    reason = gpu_skip_reason(needs_unsloth=False)
    if reason:
        pytest.skip(reason)
    config = make_config(tmp_path, tiny_model, {"source": "inline", "rows": ROWS["instruction"](ROW_COUNT)},
                         engine="trl", resources={"gpu": 1})
    result = train_in_process(tmp_path, config)
    metadata = json.loads((Path(config.output_path) / "metadata.json").read_text())
    assert metadata["engine"] == "trl" and metadata["precision"] in {"bf16", "fp16"}
    assert result["digest"] == sha256sum_digest(Path(result["uri"]))


def test_loss_covers_the_completion_only(tmp_path, tiny_model):
    from ragtune_workloads.finetune.engine import Hardware, plan_training
    from ragtune_workloads.finetune.prompts import to_records
    from ragtune_workloads.finetune.trainers import build_trainer, load_model_and_tokenizer

    config = make_config(tmp_path, tiny_model, {"source": "inline", "format": "chat", "rows": ROWS["chat"](4)})
    plan = plan_training(config, Hardware())
    model, tokenizer = load_model_and_tokenizer(plan, config.spec)
    examples = load_examples(read_rows(config.spec.dataset, None), config.spec.dataset).examples
    trainer = build_trainer(plan, config.spec, model, tokenizer, to_records(tokenizer, examples), [],
                            tmp_path / "checkpoints", [])
    row = trainer.train_dataset[3]
    learnt = [label for label in row["labels"] if label != -100]  # -100: no loss on this token
    assert tokenizer.decode(learnt) == "9<|end|>"  # the answer and end-of-turn; no system or user text
    assert tokenizer.decode(row["input_ids"]).startswith("<|system|>\nanswer with a number<|end|>")


def test_the_same_run_gives_the_same_digest(tmp_path, tiny_model):
    """A digest names content: the same recipe trained again (another process, another string-hash seed, so sets
    iterate in another order) gives the same adapter files and digest, so a pipeline can tell a rebuild from a
    change."""
    digests = []
    for seed in ("1", "2"):
        work = tmp_path / seed
        work.mkdir()
        config = make_config(work, tiny_model, {"source": "inline", "rows": ROWS["instruction"](8),
                                                "validationSplit": 0.0}, training=fast_training(maxSteps=2),
                             output={"merge": True})
        done = subprocess.run(workload_command(write_config(work / "config.json", config)),
                              env=workload_env(work, PYTHONHASHSEED=seed), capture_output=True, text=True,
                              timeout=180, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        metadata = json.loads((work / "out" / "metadata.json").read_text())
        digests.append((read_result(work)["digest"], metadata["merged"]["digest"]))
    first, second = (tmp_path / seed / "out" / "adapter" / "adapter_config.json" for seed in ("1", "2"))
    assert first.read_text() == second.read_text()
    assert digests[0] == digests[1]
