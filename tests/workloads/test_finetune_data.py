"""The fine-tuning workload's decisions that need no training: rows, prompts, engine choice, verdicts, digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest_finetune import (  # noqa: F401  (tiny_model is a fixture)
    ROWS, make_config, tiny_model, write_json_array, write_jsonl,
)
from ragtune.api.finetunejob import DatasetSpec, EvaluationSpec, FineTuneJobSpec
from ragtune_workloads.finetune import artifacts
from ragtune_workloads.finetune.data import (
    Example, Message, load_examples, read_rows, split_examples,
)
from ragtune_workloads.finetune.engine import Hardware, plan_training, resolve_engine, resolve_precision
from ragtune_workloads.finetune.errors import ConfigError, DatasetError, ExportError, ModelNotFoundError
from ragtune_workloads.finetune.evaluate import exact_match, promotion_verdict, score

FORMATS = ["instruction", "prompt-completion", "chat"]
EXPECTED_COMPLETION = {"instruction": "3 + 6 = 9", "prompt-completion": "9", "chat": "9"}


def dataset_spec(**fields) -> DatasetSpec:
    return DatasetSpec.model_validate({"source": "pvc", "pvc": {"claimName": "data"}, **fields})


def load(spec: DatasetSpec, path: Path | None):
    return load_examples(read_rows(spec, str(path) if path else None), spec)


# ---------------------------------------------------------------- reading the three formats from every source

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("writer", [write_jsonl, write_json_array], ids=["jsonl", "json"])
def test_each_format_reads_from_a_file(tmp_path, fmt, writer):
    suffix = ".jsonl" if writer is write_jsonl else ".json"
    path = writer(tmp_path / f"train{suffix}", ROWS[fmt](5))
    loaded = load(dataset_spec(format=fmt), path)
    assert loaded.rows_read == 5
    assert [e.completion for e in loaded.examples][3] == EXPECTED_COMPLETION[fmt]
    assert loaded.examples[3].prompt[-1].role == "user"


def test_configmap_mount_reads_each_key_once(tmp_path):
    # A mounted ConfigMap: visible keys are links into a hidden, timestamped directory.
    hidden = tmp_path / "..2026_11_25_data"
    write_jsonl(hidden / "a.jsonl", ROWS["instruction"](3))
    write_json_array(hidden / "b.json", ROWS["instruction"](2))
    (hidden / "notes.txt").write_text("not rows")
    for name in ("a.jsonl", "b.json", "notes.txt"):
        (tmp_path / name).symlink_to(hidden / name)
    spec = DatasetSpec.model_validate({"source": "configMap", "configMap": {"name": "rows"}})
    assert load(spec, tmp_path).rows_read == 5
    only_b = DatasetSpec.model_validate({"source": "configMap", "configMap": {"name": "rows", "key": "b.json"}})
    assert load(only_b, tmp_path).rows_read == 2


def test_inline_rows_and_field_mapping():
    spec = DatasetSpec.model_validate({
        "source": "inline", "format": "prompt-completion",
        "fieldMapping": {"prompt": "question", "completion": "answer"},
        "rows": [{"question": "two plus two", "answer": "4"}],
    })
    loaded = load(spec, None)
    assert loaded.examples == [Example((Message("user", "two plus two"),), "4")]


def test_missing_dataset_path_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load(dataset_spec(), tmp_path / "absent")


# ---------------------------------------------------------------- bad rows

def test_bad_jsonl_row_is_refused_with_its_line_number(tmp_path):
    rows = ROWS["instruction"](4)
    del rows[2]["output"]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DatasetError) as caught:
        load(dataset_spec(), path)
    assert str(caught.value).startswith('train.jsonl line 3: missing field "output"')
    assert "onBadRow: skip" in str(caught.value)


def test_rows_keep_unicode_line_separators_and_a_byte_order_mark_is_no_row(tmp_path):
    rows = ROWS["instruction"](3)
    rows[1]["output"] = "first paragraph\u2028second\u2029third\u0085end"  # JSON allows these unescaped
    text = "".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as some editors save it
    loaded = load(dataset_spec(), path)
    assert loaded.rows_read == 3 and not loaded.skipped
    assert sorted(e.completion for e in loaded.examples) == sorted(r["output"] for r in rows)
    array = tmp_path / "rows.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False).encode())
    assert load(dataset_spec(), array).rows_read == 3  # read as an array, not as JSON Lines


def test_bad_json_array_row_is_refused_with_its_line_number(tmp_path):
    rows = ROWS["prompt-completion"](6)
    rows[4]["completion"] = 9  # a number where text is expected
    path = write_json_array(tmp_path / "train.json", rows)
    with pytest.raises(DatasetError, match=r'^train.json line 6: field "completion" must be a string, got a number'):
        load(dataset_spec(format="prompt-completion"), path)


def test_broken_json_is_refused_with_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DatasetError, match=r"^train.jsonl line 2: not valid JSON"):
        load(dataset_spec(), path)


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": "hi"}], "needs at least a user message and the assistant's answer"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], "must be the assistant's"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "messages[1].role must be one of"),
    ([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "has no user message"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "a system message may only come first"),
    ("hello", "must be an array of messages, got a string"),
])
def test_bad_chat_rows_say_what_is_wrong(messages, reason):
    spec = DatasetSpec.model_validate({"source": "inline", "format": "chat", "rows": [{"messages": messages}]})
    with pytest.raises(DatasetError) as caught:
        load(spec, None)
    assert str(caught.value).startswith("inline row 1: ")
    assert reason in str(caught.value)


def test_skip_mode_counts_bad_rows_and_keeps_the_rest(tmp_path):
    rows = ROWS["instruction"](10)
    rows[1] = ["not", "an", "object"]
    rows[7]["instruction"] = ""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    loaded = load(dataset_spec(onBadRow="skip"), path)
    assert len(loaded.examples) == 8
    assert loaded.skipped == ["train.jsonl line 2: a row must be a JSON object, got an array",
                              'train.jsonl line 8: field "instruction" is empty']


def test_skip_mode_still_fails_when_no_row_is_usable(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    with pytest.raises(DatasetError, match='all 2 rows are bad; the first: train.jsonl line 1: missing field'):
        load(dataset_spec(format="prompt-completion", onBadRow="skip"), path)


# ---------------------------------------------------------------- split and digest of the data

def test_split_is_seeded_and_disjoint():
    examples = [Example((Message("user", str(i)),), str(i)) for i in range(20)]
    train, validation = split_examples(examples, 0.2, seed=7)
    assert len(validation) == 4 and len(train) == 16
    assert set(train).isdisjoint(validation)
    assert split_examples(examples, 0.2, seed=7) == (train, validation)
    assert split_examples(examples, 0.2, seed=8)[1] != validation
    assert split_examples(examples, 0.0, seed=7) == (examples, [])
    # Two rows and a small share still hold one out, and still train on one.
    assert [len(part) for part in split_examples(examples[:2], 0.1, seed=7)] == [1, 1]


def test_dataset_digest_follows_content_not_file_layout(tmp_path):
    rows = ROWS["instruction"](6)
    as_jsonl = load(dataset_spec(), write_jsonl(tmp_path / "a.jsonl", rows))
    as_json = load(dataset_spec(), write_json_array(tmp_path / "b.json", rows))
    rows[0]["output"] = "changed"
    changed = load(dataset_spec(), write_jsonl(tmp_path / "c.jsonl", rows))
    assert as_jsonl.digest == as_json.digest != changed.digest


# ---------------------------------------------------------------- prompt formatting

def test_chat_template_formats_prompt_and_completion(tiny_model):
    from transformers import AutoTokenizer

    from ragtune_workloads.finetune.prompts import format_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    example = Example((Message("user", "add 1 and 2"),), "3", context="be short")
    formatted = format_example(tokenizer, example)
    assert formatted.prompt == "<|user|>\nadd 1 and 2\n\nbe short<|end|>\n<|assistant|>\n"
    assert formatted.completion == "3<|end|>"  # ends on end-of-turn, which is eos, so generation stops there


def test_without_chat_template_the_instruction_layout_is_used(tiny_model):
    from transformers import AutoTokenizer

    from ragtune_workloads.finetune.prompts import format_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    with_input = format_example(tokenizer, Example((Message("user", "add 1 and 2"),), "3", context="be short"))
    assert with_input.prompt == "### Instruction:\nadd 1 and 2\n\n### Input:\nbe short\n\n### Response:\n"
    assert with_input.completion == "3" + tokenizer.eos_token
    chat = Example((Message("system", "answer with a number"), Message("user", "1+1"),
                    Message("assistant", "2"), Message("user", "2+2")), "4")
    assert format_example(tokenizer, chat).prompt == (
        "answer with a number\n\n### Instruction:\n1+1\n\n### Response:\n2\n\n### Instruction:\n2+2\n\n"
        "### Response:\n")


# ---------------------------------------------------------------- engine, precision and model checks

CPU = Hardware()
GPU_WITH_UNSLOTH = Hardware(nvidia_gpu=True, gpu_name="H100", bf16_supported=True, unsloth_installed=True,
                            bitsandbytes_installed=True)
GPU_WITHOUT_UNSLOTH = Hardware(nvidia_gpu=True, gpu_name="T4", bf16_supported=False)


def job_spec(**fields) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({"dataset": {"source": "inline", "rows": [{}]},
                                           "output": {"pvc": {"claimName": "out"}}, **fields})


def test_auto_engine_picks_unsloth_only_on_an_nvidia_gpu_with_unsloth():
    assert resolve_engine(job_spec(), CPU) == "trl"
    assert resolve_engine(job_spec(), GPU_WITHOUT_UNSLOTH) == "trl"
    assert resolve_engine(job_spec(), GPU_WITH_UNSLOTH) == "unsloth"
    assert resolve_engine(job_spec(engine="trl"), GPU_WITH_UNSLOTH) == "trl"


def test_qlora_without_gpu_is_refused_not_downgraded():
    with pytest.raises(ConfigError, match="method qlora .* needs an NVIDIA GPU.*use method lora"):
        resolve_engine(job_spec(method="qlora"), CPU)
    assert resolve_engine(job_spec(method="qlora"), GPU_WITH_UNSLOTH) == "unsloth"
    with pytest.raises(ConfigError, match="needs the bitsandbytes package"):
        resolve_engine(job_spec(method="qlora", engine="trl"), GPU_WITHOUT_UNSLOTH)


def test_explicit_unsloth_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="engine unsloth runs on NVIDIA GPUs only"):
        resolve_engine(job_spec(engine="unsloth"), CPU)
    with pytest.raises(ConfigError, match="needs the unsloth package"):
        resolve_engine(job_spec(engine="unsloth"), GPU_WITHOUT_UNSLOTH)


def test_precision_follows_the_hardware():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", GPU_WITH_UNSLOTH) == "bf16"
    assert resolve_precision("auto", GPU_WITHOUT_UNSLOTH) == "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="bf16 is not supported by this GPU"):
        resolve_precision("bf16", GPU_WITHOUT_UNSLOTH)


def test_missing_model_directory_is_refused(tmp_path):
    config = make_config(tmp_path, tmp_path / "no-model", {"source": "inline", "rows": [{}]})
    with pytest.raises(ModelNotFoundError, match=r"no-model holds no config.json"):
        plan_training(config, CPU)


# ---------------------------------------------------------------- evaluation verdicts

def test_scores_reward_the_right_answer():
    perfect = score(["the capital is paris"], ["the capital is paris"])
    wrong = score(["blue river"], ["the capital is paris"])
    assert perfect["exactMatch"] == 1.0 and perfect["rougeL"] == pytest.approx(1.0) and perfect["bleu"] > 99
    assert wrong["exactMatch"] == 0.0 and wrong["rougeL"] == 0.0 and wrong["bleu"] < 1
    assert exact_match(["  The Capital  is Paris"], ["the capital is paris"]) == 1.0


def test_thresholds_decide_promotion():
    metrics = {"rougeL": 0.4, "evalLoss": 1.5}
    assert promotion_verdict(metrics, EvaluationSpec()) == (True, [])
    assert promotion_verdict(metrics, EvaluationSpec(min_rouge_l=0.3, max_eval_loss=2.0)) == (True, [])
    promotable, reasons = promotion_verdict(metrics, EvaluationSpec(min_rouge_l=0.5, max_eval_loss=1.0))
    assert not promotable
    assert reasons == ["ROUGE-L 0.4000 is below minRougeL 0.5", "eval loss 1.5000 is above maxEvalLoss 1.0"]
    # Without a validation split a threshold cannot be shown to be met.
    assert promotion_verdict({}, EvaluationSpec(min_rouge_l=0.1))[0] is False


# ---------------------------------------------------------------- artifact digest and exports

def test_tree_digest_is_sha256sum_of_the_sorted_manifest(tmp_path):
    (tmp_path / "sub").mkdir()
    files = {"b.txt": b"second", "a.txt": b"first", "sub/c.bin": bytes(range(256))}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    listing = "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files))
    expected = "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    assert artifacts.tree_digest(tmp_path) == expected
    (tmp_path / "a.txt").write_bytes(b"firsT")
    assert artifacts.tree_digest(tmp_path) != expected


def test_gguf_export_without_llama_cpp_fails_before_training(tmp_path):
    empty_path = {"PATH": str(tmp_path)}
    with pytest.raises(ExportError, match="needs llama.cpp's convert_hf_to_gguf.py"):
        artifacts.gguf_preflight("q4_k_m", empty_path)
    converter = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"
    converter.parent.mkdir()
    converter.write_text("# llama.cpp's converter\n")
    with_converter = {"PATH": str(tmp_path), "LLAMA_CPP_DIR": str(converter.parent)}
    artifacts.gguf_preflight("f16", with_converter)  # the converter writes f16 itself
    with pytest.raises(ExportError, match="q4_k_m needs llama.cpp's llama-quantize"):
        artifacts.gguf_preflight("q4_k_m", with_converter)


def test_metadata_is_written_whole(tmp_path):
    target = tmp_path / "metadata.json"
    artifacts.write_metadata(target, {"digest": "sha256:x", "metrics": {"rougeL": 0.5}})
    assert json.loads(target.read_text()) == {"digest": "sha256:x", "metrics": {"rougeL": 0.5}}
    assert list(tmp_path.iterdir()) == [target]
