"""Fixtures and builders for the fine-tuning workload's tests (imported by tests/workloads/test_finetune*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV_PATHS = os.pathsep.join(str(ROOT / p) for p in ("operator", "workloads"))
for entry in (ROOT / "operator", ROOT / "workloads"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The reporter writes the result as the container's termination message; outside a pod that must not be /dev.
os.environ.setdefault("RAGTUNE_TERMINATION_LOG",
                      str(Path(tempfile.gettempdir()) / f"ragtune-termination-log-{os.getpid()}"))

from ragtune.api.workload import FineTuneConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny Llama with a chat template, built once and cached across test runs."""
    from ragtune_workloads.testing.tiny_model import tiny_llama_path

    return tiny_llama_path()


# Small arithmetic facts: short, regular answers a tiny model can start to learn in a few steps.
def instruction_rows(n: int) -> list[dict[str, Any]]:
    return [{"instruction": f"add {i} and {i + 3}", "input": "" if i % 2 else "be short",
             "output": f"{i} + {i + 3} = {2 * i + 3}"} for i in range(n)]


def prompt_completion_rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"what is {i} plus {i + 3}", "completion": f"{2 * i + 3}"} for i in range(n)]


def chat_rows(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "system", "content": "answer with a number"},
                          {"role": "user", "content": f"add {i} and {i + 3}"},
                          {"role": "assistant", "content": f"{2 * i + 3}"}]} for i in range(n)]


ROWS = {"instruction": instruction_rows, "prompt-completion": prompt_completion_rows, "chat": chat_rows}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json_array(path: Path, rows: list[Any]) -> Path:
    """One row per line inside an array, the way people write small datasets by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    return path


def fast_training(**overrides: Any) -> dict[str, Any]:
    """A training section that runs in seconds on the tiny model; the learning rate is high so a few steps
    visibly move the adapter."""
    return {"maxSteps": 12, "batchSize": 4, "gradientAccumulationSteps": 1, "learningRate": 0.01,
            "saveSteps": 6, "maxSeqLength": 128, **overrides}


def make_config(tmp_path: Path, model_path: Path, dataset: dict[str, Any], *, dataset_path: Path | None = None,
                training: dict[str, Any] | None = None, output: dict[str, Any] | None = None,
                evaluation: dict[str, Any] | None = None, **spec_fields: Any) -> FineTuneConfig:
    spec = {"model": {"name": "tiny-llama", "source": "pvc", "pvc": {"claimName": "models"}},
            "dataset": dataset, "training": training or fast_training(),
            "output": {"pvc": {"claimName": "out"}, **(output or {})},
            **({"evaluation": evaluation} if evaluation else {}), **spec_fields}
    return FineTuneConfig.model_validate({
        "owner": {"kind": "FineTuneJob", "name": "test", "namespace": "default"},
        "spec": spec,
        "modelPath": str(model_path),
        "datasetPath": str(dataset_path) if dataset_path else None,
        "outputPath": str(tmp_path / "out"),
    })


def write_config(path: Path, config: FineTuneConfig) -> Path:
    path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    return path


def workload_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": ENV_PATHS, "HF_HUB_OFFLINE": "1",
           "RAGTUNE_PROGRESS_FILE": str(tmp_path / "progress.json"),
           "RAGTUNE_TERMINATION_LOG": str(tmp_path / "termination-log"), **extra}
    env.pop("POD_NAME", None)
    return env


def workload_command(config_file: Path) -> list[str]:
    return [sys.executable, "-m", "ragtune_workloads.finetune", "--config", str(config_file)]


def run_workload(tmp_path: Path, config: FineTuneConfig, timeout: float = 120) -> subprocess.CompletedProcess:
    config_file = write_config(tmp_path / "config.json", config)
    return subprocess.run(workload_command(config_file), env=workload_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def read_progress(tmp_path: Path) -> dict[str, Any]:
    published = json.loads((tmp_path / "progress.json").read_text())
    return json.loads(published["ragtune.io/progress"])


def read_result(tmp_path: Path) -> dict[str, Any]:
    published = json.loads((tmp_path / "progress.json").read_text())
    return json.loads(published["ragtune.io/result"])
