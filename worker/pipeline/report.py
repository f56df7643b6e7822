"""The end of a job: the final model's metrics, the gates, and the files that describe the
run (model_card.json, report.json). Every artifact is hashed once, here."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from distillery.gates import spec_gates
from worker.pipeline import speed
from worker.pipeline.choose import Choice, choose, relative
from worker.pipeline.files import sha256_file
from worker.pipeline.spec import JobSpec
from worker.pipeline.stages import STAGES
from worker.pipeline.state import JobState

# Files the runner itself writes beside the stages' artifacts.
RUN_FILES = {"history.csv": "csv", "model_card.json": "json"}
PROFILE = "profile.json"  # the final model's time per operator type on ONNX Runtime


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


def model_files(state: JobState, keys: list[str]) -> dict[str, Path]:
    """The ONNX file each model was measured from (those still on disk)."""
    from worker.pipeline.quantize import QUANTIZERS

    files = {}
    for key in keys:
        if key == "teacher":
            path = state.teacher_onnx()
        elif key == "quantized":
            assert state.spec.quantize is not None
            path = state.out / QUANTIZERS.get(state.spec.quantize.method).filename
        else:
            path = state.work / f"{key}.onnx"
        if path.exists():
            files[key] = path
    return files


def speed_evidence(state: JobState, parents: dict[str, str | None]) -> dict[str, Any]:
    """Each model against its parent and the teacher, by interleaved runs: measured once per
    job and kept (the export stage and the report must make the same choice)."""
    path = state.state_dir / "speed.json"
    if path.exists():
        return json.loads(path.read_text())
    files = model_files(state, ["teacher", *parents])
    sample = state.data.x_test[:1].numpy()
    ev = speed.evidence(
        files,
        parents,
        files.get("teacher"),
        sample,
        state.spec.evaluate,
        vs_teacher=list(parents),
        seed=state.spec.seed,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ev))
    return ev


def choose_final(state: JobState) -> tuple[Choice, dict[str, Any]]:
    """Which model the job hands over, by the spec's objective among the models passing the
    gates (a compression no smaller, or no faster, than its parent is never it, nor one proven
    slower than it); and its metrics against the teacher, with the accuracy drop's paired
    interval and the speedups' intervals from interleaved runs."""
    import numpy as np

    parents = stage_models(state)
    teacher_correct = np.load(state.correct_path("teacher"))
    ev = speed_evidence(state, parents)

    def correct(key: str):
        path = state.correct_path(key)
        return np.load(path) if path.exists() else None

    t = state.metrics["teacher"]
    metrics = {
        k: relative(state.metrics[k], t, teacher_correct, correct(k), ev.get(k)) for k in parents
    }
    choice = choose(
        metrics,
        parents,
        objective=state.spec.goal,
        gates=spec_gates(state.spec.gates),
        max_slowdown=state.spec.gates.max_slowdown,
    )
    final = {**metrics[choice.final], "model": choice.final, "reason": choice.reason}
    if "baseline" in state.metrics:
        # What the teacher bought: positive when distillation beat training alone.
        gain = state.metrics["student"]["accuracy"] - state.metrics["baseline"]["accuracy"]
        final["distill_gain"], final["student_kept"] = gain, state.kept
    return choice, final


def speed_report(state: JobState, final_key: str) -> dict[str, Any]:
    """The host's int8 capability, every comparison, whether int8 paid and if not why; and
    profile.json, the final model's time per operator type."""
    from worker.pipeline.quantize import QUANTIZERS  # onnxruntime, as the functions above

    parents = stage_models(state)
    ev = speed_evidence(state, parents)
    files = model_files(state, [final_key, *parents])
    out: dict[str, Any] = {"cpu": speed.host(), "comparisons": ev}
    q = state.spec.quantize
    if "quantized" in files and q is not None and QUANTIZERS.get(q.method).int8:
        parent = parents["quantized"]
        assert parent is not None
        parent_ms = state.metrics[parent]["latency_ms"]
        comparison = ev.get("quantized", {}).get("parent", {}).get("b1")
        out["int8"] = speed.int8_verdict("quantized", parent_ms, files["quantized"], comparison)
    if final_key in files:
        profile = speed.op_profile(
            files[final_key], state.data.x_test[:1].numpy(), threads=state.spec.evaluate.threads
        )
        (state.out / PROFILE).write_text(json.dumps({"key": final_key, **profile}, indent=2))
    return out


TOP_OFFENDERS = 5  # the most sensitive nodes the report names


def quantize_card(
    spec: Any, metrics: dict[str, Any] | None, stage: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """What the model card says of quantization: the method; for int8_static its calibration
    and for int8_static and qat the weight width and what chose it (the spec's deployment
    target or this worker's CPU); for qat its fine-tune; when it went node by node (`stage`:
    the quantize stage's metrics), the nodes kept in float, their share of the model, what
    accuracy control did and the nodes that cost int8 the most."""
    if spec is None:
        return None
    out: dict[str, Any] = {"method": spec.method}
    if spec.method == "int8_static":
        out["calibration"] = spec.calibration
        if spec.calibration == "percentile":
            out["calibration_percentile"] = spec.calibration_percentile
    if spec.method == "qat":
        out["qat_epochs"], out["qat_lr"] = spec.qat_epochs, spec.qat_lr
    if metrics is not None and "weight_bits" in metrics:
        out["weight_bits"] = metrics["weight_bits"]
        out["weight_bits_from"] = (
            "spec" if spec.weight_bits is not None else "the worker's CPU flags"
        )
    if stage and "float_nodes" in stage:
        keys = ("float_nodes", "float_share", "float_node_share", "quantizable_nodes")
        out.update({k: stage[k] for k in keys if k in stage})
        if "accuracy_control" in stage:
            ac = stage["accuracy_control"]
            out["accuracy_control"] = {
                **{k: ac[k] for k in ("budget", "met", "val_accuracy_drop_whole")},
                "val_accuracy_drop": ac["val_accuracy_drop"],
                "val_samples": stage.get("val_samples"),
                "test_accuracy_drop": stage.get("test_accuracy_drop"),
                "test_accuracy_drop_ci": stage.get("test_accuracy_drop_ci"),
            }
        if "sensitivity" in stage:
            out["top_offenders"] = stage["sensitivity"][:TOP_OFFENDERS]
    if stage and "qat_fallback" in stage:  # the int8 file is qat's: why PTQ handed over
        out["qat_fallback"] = stage["qat_fallback"]
        out["qat_epochs"], out["qat_lr"] = spec.qat_epochs, spec.qat_lr
    return out


def stage_metrics(state: JobState, name: str) -> dict[str, Any] | None:
    """The metrics a stage recorded (also when an earlier attempt ran it)."""
    for record in state.records:
        if record["name"] == name:
            return record.get("metrics", {})
    return None


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
    speed_section = speed_report(state, choice.final)
    made = describe(out, {**STAGES.artifacts(spec), "history.csv": "csv", PROFILE: "json"})
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
        "quantize": quantize_card(
            spec.quantize, state.metrics.get("quantized"), stage_metrics(state, "quantize")
        ),
        "speed": speed_section,
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
        "speed": speed_section,
        "quantize": card["quantize"],
        "stages": state.records,
        "artifacts": made + mark_final(describe(out, {"model_card.json": "json"}), None),
        "wall_seconds": wall_seconds,
        "versions": card["versions"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
