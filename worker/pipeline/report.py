"""The end of a job: the final model's metrics, the gates, and the files that describe the
run (model_card.json, report.json). Every artifact is hashed once, here."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distillery.gates import spec_gates
from worker.pipeline.choose import Choice, choose, relative
from worker.pipeline.files import sha256_file
from worker.pipeline.spec import JobSpec
from worker.pipeline.stages import STAGES
from worker.pipeline.state import JobState

# Files the runner itself writes beside the stages' artifacts.
RUN_FILES = {"history.csv": "csv", "model_card.json": "json"}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def stage_models(state: JobState) -> dict[str, str | None]:
    """The models a plain job made, each with the one it was derived from: the kept student
    (reported as `student`, or `baseline` when training alone won), then `pruned` from it,
    then `quantized` from the last float model. A compress-only job's models derive from the
    teacher, which is a candidate too: when no compression pays, the teacher is handed back."""
    if state.compress_only:
        kept = "teacher"
    else:
        kept = "baseline" if state.kept == "baseline" else "student"
    made: dict[str, str | None] = {kept: None}
    float_parent = kept
    if "pruned" in state.metrics:
        made["pruned"] = kept
        float_parent = "pruned"
    if "quantized" in state.metrics:
        made["quantized"] = float_parent
    return made


def choose_final(state: JobState) -> tuple[Choice, dict[str, Any]]:
    """Which model the job hands over, by the spec's objective among the models passing the
    gates (a compression no smaller, or no faster, than its parent is never it); and its
    metrics against the teacher, with the accuracy drop's paired interval."""
    import numpy as np

    parents = stage_models(state)
    teacher_correct = np.load(state.correct_path("teacher"))

    def correct(key: str):
        path = state.correct_path(key)
        return np.load(path) if path.exists() else None

    metrics = {
        k: relative(state.metrics[k], state.metrics["teacher"], teacher_correct, correct(k))
        for k in parents
    }
    choice = choose(metrics, parents, objective=state.spec.goal, gates=spec_gates(state.spec.gates))
    final = {**metrics[choice.final], "model": choice.final, "reason": choice.reason}
    if "baseline" in state.metrics:
        # What the teacher bought: positive when distillation beat training alone.
        gain = state.metrics["student"]["accuracy"] - state.metrics["baseline"]["accuracy"]
        final["distill_gain"], final["student_kept"] = gain, state.kept
    return choice, final


def init_report(state: JobState) -> dict[str, Any]:
    """Each model that started from given weights, by field (`student.init`): where from (as
    the user wrote it, no server path), how many tensors it took, and whether the classifier
    head was replaced (the file was trained for another number of classes)."""
    out = {}
    for name, plan in state.inits.items():
        source: Any = state.public_spec
        for part in name.split("."):
            source = source.get(part) if isinstance(source, dict) else None
        if isinstance(source, dict) and source.get("source") == "safetensors":
            source = {"source": "safetensors", "file": Path(str(source.get("path"))).name}
        out[name] = {
            "from": source,
            "tensors_loaded": len(plan.load),
            "head_replaced": plan.head_replaced,
            "replaced": plan.replaced,
        }
    return out


def describe(out: Path, files: dict[str, str]) -> list[dict[str, Any]]:
    """name, format, bytes and sha256 of each file that exists (each read once)."""
    return [
        {"name": n, "format": f, "bytes": (out / n).stat().st_size, "sha256": sha256_file(out / n)}
        for n, f in files.items()
        if (out / n).exists()
    ]


def final_file(spec: JobSpec, quantizer: str | None) -> str | None:
    """The file a user deploys the final model from: the quantized ONNX when the final model
    is quantized (by `quantizer`), else its float export (ONNX if the spec exports it)."""
    from worker.pipeline.export import EXPORTERS
    from worker.pipeline.quantize import QUANTIZERS

    if quantizer is not None:
        return QUANTIZERS.get(quantizer).filename
    formats = sorted(spec.export, key=lambda f: f != "onnx")  # onnx first: what is measured
    return EXPORTERS.get(formats[0]).filename if formats else None


def mark_final(artifacts: list[dict[str, Any]], name: str | None) -> list[dict[str, Any]]:
    """`artifacts` (describe's), each with `final`: whether it is the file named `name`."""
    return [{**a, "final": a["name"] == name} for a in artifacts]


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
    choice, final = choose_final(state)
    arch, arch_kwargs = state.subject_arch()
    state.metrics["final"] = final
    gates = choice.gates[choice.final]
    made = describe(out, {**STAGES.artifacts(spec), "history.csv": "csv"})
    quantizer = spec.quantize.method if choice.final == "quantized" and spec.quantize else None
    made = mark_final(made, final_file(spec, quantizer))
    card = {
        "name": spec.name,
        "created_at": now(),
        "spec": state.public_spec,
        "model": {
            "arch": arch,
            "arch_kwargs": arch_kwargs,
            "params": final["params"],
            "final": final["model"],
        },
        "input": state.data.input_contract,
        "metrics": state.metrics,
        "init": init_report(state),
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
        "gates_passed": choice.gates_passed,
        "compress_only": state.compress_only,
        "init": card["init"],
        "stages": state.records,
        "artifacts": made + mark_final(describe(out, {"model_card.json": "json"}), None),
        "wall_seconds": wall_seconds,
        "versions": card["versions"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
