"""Benchmark of the fine-tuning workload; prints one JSON object.

CPU path (always): the workload program (`python -m ragtune_workloads.finetune`) trains a LoRA adapter on the
tiny Llama; reported are training tokens per second (non-padding tokens seen by the optimizer, measured by the
workload itself) and the program's peak RSS.

GPU path (only with an NVIDIA GPU and unsloth installed): the same config trained with engine trl and engine
unsloth in this run; the target is unsloth >= 1.8x trl tokens/s. Without them the target is reported with
value null, met false and the reason: never estimated.

  PYTHONPATH=operator:workloads HF_HUB_OFFLINE=1 python bench/finetune.py [--quick] [--model DIR]
"""

from __future__ import annotations

import os.path
import sys

# Python puts this script's folder first on sys.path, where bench/operator.py would shadow the standard library's
# `operator` module (imported by argparse, json, ...). Only the repository paths below are needed.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "workloads")]

from ragtune.api.workload import FineTuneConfig  # noqa: E402

# Targets for the tiny model on a 2-core CPU: the path must train at a useful pace without the weight of a real
# model; a regression in data collation or a stray full-precision copy shows here first.
CPU_TOKENS_PER_SECOND_TARGET = 1000.0
CPU_PEAK_RSS_MB_TARGET = 2048.0
UNSLOTH_SPEEDUP_TARGET = 1.8


def rows(count: int) -> list[dict]:
    # Sentences of a realistic shape: an instruction, some context, a one-line answer.
    return [{"instruction": f"Explain in one sentence what step {i} of the rollout does.",
             "input": f"The rollout has {i % 7 + 3} steps; step {i} updates the adapter on node {i % 5}.",
             "output": f"Step {i} updates the adapter on node {i % 5}, one of {i % 7 + 3} steps."}
            for i in range(count)]


def make_config(model: Path, output: Path, *, steps: int, engine: str, gpu: bool) -> FineTuneConfig:
    return FineTuneConfig.model_validate({
        "owner": {"kind": "FineTuneJob", "name": "bench", "namespace": "bench"},
        "spec": {
            "model": {"name": "bench-model", "source": "pvc", "pvc": {"claimName": "models"}},
            "dataset": {"source": "inline", "rows": rows(256), "validationSplit": 0.0},
            "engine": engine,
            "training": {"maxSteps": steps, "batchSize": 8, "gradientAccumulationSteps": 1,
                         "saveSteps": steps, "maxSeqLength": 256},
            "resources": {"gpu": 1 if gpu else 0},
            "output": {"pvc": {"claimName": "out"}},
        },
        "modelPath": str(model),
        "outputPath": str(output),
    })


def run_workload(config: FineTuneConfig, workdir: Path) -> dict:
    """Runs the program in a child process; returns its metrics, wall time and peak RSS."""
    config_file = workdir / "config.json"
    config_file.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "workloads")]),
           "HF_HUB_OFFLINE": "1", "RAGTUNE_PROGRESS_FILE": str(workdir / "progress.json"),
           "RAGTUNE_TERMINATION_LOG": str(workdir / "termination-log")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    process = subprocess.run([sys.executable, "-m", "ragtune_workloads.finetune", "--config", str(config_file)],
                             env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(process.stderr.strip().splitlines()[-1] if process.stderr.strip() else "failed")
    # ru_maxrss is the largest child so far (KiB on Linux); each run is the largest child when it is measured
    # first, and runs are ordered so.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    metadata = json.loads((Path(config.output_path) / "metadata.json").read_text())
    return {"metrics": metadata["metrics"], "wallSeconds": round(wall, 2),
            "peakRssMb": round(max(peak_kib, before) / 1024, 1), "engine": metadata["engine"]}


def target(name: str, value: float | None, goal: str, met: bool, **extra) -> dict:
    return {"name": name, "value": value, "target": goal, "met": met, **extra}


def gpu_comparison(model: Path, steps: int, workdir: Path) -> tuple[dict | None, str | None]:
    import torch

    if not torch.cuda.is_available():
        return None, "no NVIDIA GPU on this machine"
    if importlib.util.find_spec("unsloth") is None:
        return None, "unsloth is not installed (it belongs to the GPU image, workloads/requirements-gpu.txt)"
    measured = {}
    for engine in ("trl", "unsloth"):
        out = workdir / f"gpu-{engine}"
        out.mkdir()
        measured[engine] = run_workload(make_config(model, out / "out", steps=steps, engine=engine, gpu=True), out)
    return measured, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: under a minute")
    parser.add_argument("--model", type=Path, help="base model directory (default: the cached tiny Llama)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ragtune_workloads.testing.tiny_model import tiny_llama_path

    model = args.model or tiny_llama_path()
    steps = 30 if args.quick else 200
    with tempfile.TemporaryDirectory(prefix="ragtune-bench-finetune-") as tmp:
        workdir = Path(tmp)
        (workdir / "cpu").mkdir()
        cpu = run_workload(make_config(model, workdir / "cpu" / "out", steps=steps, engine="trl", gpu=False),
                           workdir / "cpu")
        gpu, skipped = gpu_comparison(model, steps, workdir)

    tokens_per_second = cpu["metrics"].get("trainTokensPerSecond")
    targets = [
        target("cpu_train_tokens_per_second", round(tokens_per_second, 1) if tokens_per_second else None,
               f">= {CPU_TOKENS_PER_SECOND_TARGET:g}",
               bool(tokens_per_second and tokens_per_second >= CPU_TOKENS_PER_SECOND_TARGET)),
        target("cpu_peak_rss_mb", cpu["peakRssMb"], f"<= {CPU_PEAK_RSS_MB_TARGET:g}",
               cpu["peakRssMb"] <= CPU_PEAK_RSS_MB_TARGET),
    ]
    if gpu:
        ratio = gpu["unsloth"]["metrics"]["trainTokensPerSecond"] / gpu["trl"]["metrics"]["trainTokensPerSecond"]
        targets.append(target("gpu_unsloth_over_trl_tokens_per_second", round(ratio, 2),
                              f">= {UNSLOTH_SPEEDUP_TARGET}", ratio >= UNSLOTH_SPEEDUP_TARGET))
    else:
        targets.append(target("gpu_unsloth_over_trl_tokens_per_second", None, f">= {UNSLOTH_SPEEDUP_TARGET}",
                              False, skipped=skipped))
    print(json.dumps({
        "benchmark": "finetune",
        "mode": "quick" if args.quick else "full",
        "model": str(model),
        "steps": steps,
        "batchSize": 8,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "cpu": {"engine": cpu["engine"], "trainTokensPerSecond": tokens_per_second,
                "trainSeconds": cpu["metrics"].get("trainSeconds"), "trainLoss": cpu["metrics"].get("trainLoss"),
                "wallSeconds": cpu["wallSeconds"], "peakRssMb": cpu["peakRssMb"]},
        "gpu": gpu,
        "targets": targets,
    }))


if __name__ == "__main__":
    main()
