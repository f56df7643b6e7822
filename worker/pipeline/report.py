"""The end of a job: the final model's metrics, the gates, and the files that describe the
run (model_card.json, report.json). Every artifact is hashed once, here."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distillery.gates import check_all, spec_gates
from worker.pipeline.files import sha256_file
from worker.pipeline.stages import STAGES
from worker.pipeline.state import JobState

MODEL_METRICS = ("accuracy", "params", "size_bytes", "latency_ms")
# Files the runner itself writes beside the stages' artifacts.
RUN_FILES = {"history.csv": "csv", "model_card.json": "json"}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def final_metrics(metrics: dict[str, dict[str, Any]], kept: str = "distilled") -> dict[str, Any]:
    """The last model made (quantized, else pruned, else the kept student) against the teacher."""
    student = "baseline" if kept == "baseline" else "student"
    last = next(k for k in ("quantized", "pruned", student) if k in metrics)
    final: dict[str, Any] = {k: metrics[last][k] for k in MODEL_METRICS}
    final["model"] = last
    teacher = metrics["teacher"]
    final["accuracy_drop"] = teacher["accuracy"] - final["accuracy"]
    final["size_ratio"] = teacher["size_bytes"] / max(final["size_bytes"], 1)
    final["speedup"] = teacher["latency_ms"] / max(final["latency_ms"], 1e-9)
    if "baseline" in metrics:
        # What the teacher bought: positive when distillation beat training alone.
        final["distill_gain"] = metrics["student"]["accuracy"] - metrics["baseline"]["accuracy"]
        final["student_kept"] = kept
    return final


def describe(out: Path, files: dict[str, str]) -> list[dict[str, Any]]:
    """name, format, bytes and sha256 of each file that exists (each read once)."""
    return [
        {"name": n, "format": f, "bytes": (out / n).stat().st_size, "sha256": sha256_file(out / n)}
        for n, f in files.items()
        if (out / n).exists()
    ]


def versions() -> dict[str, str]:
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def write(state: JobState, *, device: str, wall_seconds: float) -> dict[str, Any]:
    """model_card.json and report.json for a finished run; returns the report."""
    spec, out = state.spec, state.out
    final = state.metrics["final"] = final_metrics(state.metrics, state.kept)
    gates = check_all(spec_gates(spec.gates), state.metrics)
    made = describe(out, {**STAGES.artifacts(spec), "history.csv": "csv"})
    card = {
        "name": spec.name,
        "created_at": now(),
        "spec": state.public_spec,
        "model": {
            "arch": spec.student.arch,
            "arch_kwargs": spec.student.arch_kwargs,
            "params": final["params"],
            "final": final["model"],
        },
        "input": state.data.input_contract,
        "metrics": state.metrics,
        "artifacts": made,
        "versions": versions(),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    report = {
        "name": spec.name,
        "spec": state.public_spec,
        "device": device,
        "dataset": state.data.summary(),
        "metrics": state.metrics,
        "gates": gates,
        "gates_passed": all(g["passed"] for g in gates),
        "stages": state.records,
        "artifacts": made + describe(out, {"model_card.json": "json"}),
        "wall_seconds": wall_seconds,
        "versions": card["versions"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
