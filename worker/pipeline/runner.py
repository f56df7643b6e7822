"""Run a whole job: teacher -> [baseline] -> distill -> [prune] -> [quantize] -> export.

Each stage measures the model it produced on the deployment runtime as soon as it finishes
and records itself under `<out>/.work/state/`, so a re-run over the same folder resumes
after the last finished stage (and, inside a training stage, after its last epoch).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.pipeline import distill as distill_stage
from worker.pipeline import preflight
from worker.pipeline import prune as prune_stage
from worker.pipeline import quantize as quantize_stage
from worker.pipeline import teacher as teacher_stage
from worker.pipeline.archs import count_params
from worker.pipeline.context import StageContext, resolve_device
from worker.pipeline.data import DataBundle, load_dataset
from worker.pipeline.distill import TeacherSignal
from worker.pipeline.evaluate import measure, onnx_params
from worker.pipeline.export import (
    export_onnx,
    export_safetensors,
    export_torchscript,
    sha256_file,
)
from worker.pipeline.gates import check_all, spec_gates
from worker.pipeline.history import HistoryLog
from worker.pipeline.limits import SpecLimits
from worker.pipeline.plan import stage_plan
from worker.pipeline.spec import JobSpec, TrainedTeacher

EventFn = Callable[[dict[str, Any]], None]
MODEL_METRICS = ("accuracy", "params", "size_bytes", "latency_ms")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class _Run:
    spec: JobSpec
    out: Path
    ctx: StageContext
    emit: EventFn
    data: DataBundle
    work: Path = field(init=False)
    state: Path = field(init=False)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    teacher: teacher_stage.TeacherResult | None = None
    signal: TeacherSignal | None = None
    models: dict[str, nn.Module] = field(default_factory=dict)
    public_spec: dict[str, Any] | None = None
    kept: str = "distilled"  # which student went on to pruning: "distilled" or "baseline"

    def __post_init__(self) -> None:
        self.work = self.out / ".work"
        self.state = self.work / "state"
        self.state.mkdir(parents=True, exist_ok=True)

    # -- helpers ------------------------------------------------------------------------------

    def measure_onnx(self, key: str, path: Path, params: int | None) -> dict[str, float]:
        m = measure(path, self.data.x_test, self.data.y_test, self.spec.evaluate, params)
        self.metrics[key] = m
        self.emit({"type": "metrics", "model": key, "metrics": m})
        return m

    def measure_module(self, key: str, model: nn.Module) -> dict[str, float]:
        path = export_onnx(model, self.data.x_test, self.work / f"{key}.onnx")
        return self.measure_onnx(key, path, count_params(model))

    def save_model(self, key: str, model: nn.Module, arch: str, arch_kwargs: dict) -> None:
        export_safetensors(
            model, self.state / f"{key}.safetensors", arch=arch, arch_kwargs=arch_kwargs
        )

    def load_model(self, key: str, arch: str, arch_kwargs: dict) -> nn.Module:
        path = self.state / f"{key}.safetensors"
        return teacher_stage.load_safetensors(path, arch, arch_kwargs, self.data).to(
            self.ctx.device
        )

    def teacher_signal(self) -> TeacherSignal:
        if self.signal is None:
            assert self.teacher is not None
            self.signal = distill_stage.teacher_signal(
                self.teacher, self.data, self.spec.distill, self.ctx
            )
        return self.signal

    # -- stages -------------------------------------------------------------------------------

    def stage_teacher(self, ctx: StageContext, resumed: bool) -> dict[str, float]:
        spec = self.spec.teacher
        if isinstance(spec, TrainedTeacher) and resumed:
            model = self.load_model("teacher", spec.arch, spec.arch_kwargs)
            self.teacher = teacher_stage.TeacherResult(
                model, model, None, {}, spec.arch, dict(spec.arch_kwargs)
            )
            return {}
        result = teacher_stage.run(spec, self.data, ctx, self.spec.seed)
        self.teacher = result
        if resumed:  # an upload: reloading it is cheap, its metrics are on record
            return result.metrics
        if isinstance(spec, TrainedTeacher):
            self.save_model("teacher", result.module, spec.arch, spec.arch_kwargs)
        if result.onnx_path is not None:
            self.measure_onnx("teacher", result.onnx_path, onnx_params(result.onnx_path))
        else:
            self.measure_module("teacher", result.module)
        return result.metrics

    def stage_baseline(self, ctx: StageContext, resumed: bool) -> dict[str, float]:
        s = self.spec
        if resumed:
            self.models["baseline"] = self.load_model(
                "baseline", s.student.arch, s.student.arch_kwargs
            )
            return {}
        model, metrics = distill_stage.train_student(
            s.student, s.distill, self.data, ctx, s.seed, signal=None, tag="baseline"
        )
        self.models["baseline"] = model
        self.save_model("baseline", model, s.student.arch, s.student.arch_kwargs)
        self.measure_module("baseline", model)
        return metrics

    def stage_distill(self, ctx: StageContext, resumed: bool) -> dict[str, float]:
        s = self.spec
        if resumed:
            self.kept = self.selection_of_record()
            self.models["student"] = self.load_model("kept", s.student.arch, s.student.arch_kwargs)
            return {}
        assert self.teacher is not None
        model, metrics, self.signal = distill_stage.run(
            self.teacher, self.data, s.distill, s.student, ctx, s.seed, signal=self.signal
        )
        self.measure_module("student", model)
        kept, selection = self.select(model)
        metrics.update(selection)
        self.models["student"] = self.models[kept] if kept == "baseline" else model
        self.save_model("kept", self.models["student"], s.student.arch, s.student.arch_kwargs)
        if kept == "baseline":
            ctx.log(
                "the student trained without a teacher scored higher on the validation split "
                f"({selection['val_accuracy_baseline']:.4f} vs {selection['val_accuracy_distilled']:.4f}): keeping it"
            )
        return metrics

    def select(self, distilled: nn.Module) -> tuple[str, dict[str, Any]]:
        """Keep the better of the distilled student and the no-teacher baseline, judged on the
        validation split (never the test split, which only measures)."""
        self.kept = "distilled"
        baseline = self.models.get("baseline")
        data = self.data
        if self.spec.distill.keep != "better" or baseline is None or data.x_val is None:
            return "distilled", {"kept": self.kept}
        from worker.pipeline.train import accuracy

        val = {
            "distilled": accuracy(distilled, data.x_val, data.y_val, self.ctx.device),
            "baseline": accuracy(baseline, data.x_val, data.y_val, self.ctx.device),
        }
        # Ties go to the distilled student: it also learned the teacher's soft targets.
        self.kept = "baseline" if val["baseline"] > val["distilled"] else "distilled"
        return self.kept, {
            "kept": self.kept,
            "val_accuracy_distilled": val["distilled"],
            "val_accuracy_baseline": val["baseline"],
        }

    def selection_of_record(self) -> str:
        record = json.loads((self.state / "distill.json").read_text())
        return record.get("metrics", {}).get("kept", "distilled")

    def stage_prune(self, ctx: StageContext, resumed: bool) -> dict[str, float]:
        s = self.spec
        if resumed:
            self.models["pruned"] = self.load_model("pruned", s.student.arch, s.student.arch_kwargs)
            return {}
        assert s.prune is not None
        base = self.models["student"]
        model, metrics = prune_stage.run(
            base, self.data, s.prune, s.distill, self.teacher_signal(), ctx, s.seed
        )
        self.models["pruned"] = model
        self.save_model("pruned", model, s.student.arch, s.student.arch_kwargs)
        self.measure_module("pruned", model)
        return metrics

    def final_float(self) -> tuple[str, nn.Module]:
        key = "pruned" if "pruned" in self.models else "student"
        return key, self.models[key]

    def stage_quantize(self, ctx: StageContext, resumed: bool) -> dict[str, float]:
        s = self.spec
        assert s.quantize is not None
        key, model = self.final_float()
        dst = self.out / f"model.{quantize_stage.SUFFIX[s.quantize.method]}.onnx"
        if not resumed or not dst.exists():
            src = export_onnx(model, self.data.x_test, self.work / f"{key}.onnx")
            calib = self.data.calibration(s.quantize.calibration_samples, s.seed)
            quantize_stage.run(src, dst, calib, s.quantize)
        m = self.measure_onnx("quantized", dst, count_params(model))
        return {"method_" + s.quantize.method: 1.0, "accuracy": m["accuracy"]}

    def stage_export(self, ctx: StageContext, resumed: bool) -> dict[str, float]:
        s = self.spec
        _, model = self.final_float()
        example = self.data.x_test[:1]
        if "onnx" in s.export:
            export_onnx(model, example, self.out / "model.onnx")
        if "torchscript" in s.export:
            export_torchscript(model, example, self.out / "model.torchscript.pt")
        if "safetensors" in s.export:
            export_safetensors(
                model,
                self.out / "model.safetensors",
                arch=s.student.arch,
                arch_kwargs=s.student.arch_kwargs,
                spec=self.public_spec,
            )
        return {}


def _final(metrics: dict[str, dict[str, float]], kept: str = "distilled") -> dict[str, float]:
    student = "baseline" if kept == "baseline" else "student"
    last = next(k for k in ("quantized", "pruned", student) if k in metrics)
    final = {k: metrics[last][k] for k in MODEL_METRICS}
    final["model"] = last  # type: ignore[assignment]
    teacher = metrics["teacher"]
    final["accuracy_drop"] = teacher["accuracy"] - final["accuracy"]
    final["size_ratio"] = teacher["size_bytes"] / max(final["size_bytes"], 1)
    final["speedup"] = teacher["latency_ms"] / max(final["latency_ms"], 1e-9)
    if "baseline" in metrics:
        # What the teacher bought: positive when distillation beat training alone.
        final["distill_gain"] = metrics["student"]["accuracy"] - metrics["baseline"]["accuracy"]
        final["student_kept"] = kept  # type: ignore[assignment]
    return final


ARTIFACT_FORMATS = {
    "model.onnx": "onnx",
    "model.int8.onnx": "onnx-int8",
    "model.int8_dynamic.onnx": "onnx-int8-dynamic",
    "model.fp16.onnx": "onnx-fp16",
    "model.torchscript.pt": "torchscript",
    "model.safetensors": "safetensors",
    "model_card.json": "json",
    "history.csv": "csv",
}


def _artifacts(out: Path) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "format": fmt,
            "bytes": (out / name).stat().st_size,
            "sha256": sha256_file(out / name),
        }
        for name, fmt in ARTIFACT_FORMATS.items()
        if (out / name).exists()
    ]


def _versions() -> dict[str, str]:
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def run_pipeline(
    spec: JobSpec,
    out_dir: Path | str,
    *,
    on_event: EventFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    resume: bool = True,
    public_spec: dict[str, Any] | None = None,
    limits: SpecLimits | None = None,
) -> dict[str, Any]:
    """Run `spec`, write artifacts and `report.json` into `out_dir`, return the report.

    Events go to `on_event` as dicts: `stage` (status changes), `progress` (overall 0..1),
    `log`, `metrics` and `history` (`row`: one epoch of a training run, every one of them).
    Raises a PipelineError subclass (with a `.code`) on failure.
    `public_spec` is what the report and model card show (the service passes the user's spec,
    without the server paths its uploads were resolved to). `limits` bound the models the
    spec describes (default: `SpecLimits()`); a spec past them fails before any is built.
    """
    limits = limits or SpecLimits()
    teacher = preflight.teacher_of(spec)
    preflight.check_bounds([preflight.student_of(spec), teacher], limits)  # before the data
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out / ".work", ignore_errors=True)
    emit: EventFn = on_event or (lambda e: None)
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    device = resolve_device(spec.device)
    plan = stage_plan(spec)
    total_w = sum(w for _, w in plan)
    done_w = 0.0

    def on_progress(stage: str, fraction: float, message: str) -> None:
        if fraction < 0:
            emit({"type": "log", "stage": stage, "message": message})
            return
        w = dict(plan)[stage]
        emit(
            {
                "type": "progress",
                "stage": stage,
                "stage_progress": fraction,
                "progress": min((done_w + w * fraction) / total_w, 1.0),
                "message": message,
            }
        )

    (out / ".work").mkdir(exist_ok=True)
    history = HistoryLog(out / ".work" / "history.jsonl")  # a resumed job keeps its rows

    def on_history(row: dict[str, Any]) -> None:
        history.add(row)
        emit({"type": "history", "row": row})

    root = StageContext(
        device, out / ".work" / "checkpoints", on_progress, should_cancel, on_history=on_history
    )
    data = load_dataset(spec.dataset, spec.seed, workdir=out / ".work")
    emit({"type": "log", "stage": "data", "message": f"dataset: {data.summary()}"})
    # Before the teacher stage: a spec that cannot work (a layer-name typo, an arch that does
    # not fit, a model past the limits) fails now, not after the teacher has trained.
    preflight.preflight(
        spec,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        limits=limits,
        teacher=teacher,
    )
    run = _Run(spec, out, root, emit, data, public_spec=public_spec or spec.model_dump(mode="json"))
    for name, weight in plan:
        record_path = run.state / f"{name}.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        resumed = record is not None
        ctx = root.for_stage(name)
        if not resumed:
            root.check_cancel()
            record = {"name": name, "status": "running", "started_at": _now()}
            emit({"type": "stage", "stage": name, "status": "running"})
        t0 = time.perf_counter()
        stage_metrics = getattr(run, f"stage_{name}")(ctx, resumed)
        if resumed:
            run.metrics.update(record.get("models", {}))
            emit({"type": "stage", "stage": name, "status": "succeeded", "resumed": True})
        else:
            models = {k: v for k, v in run.metrics.items() if k in _stage_models(name)}
            record.update(
                status="succeeded",
                finished_at=_now(),
                seconds=time.perf_counter() - t0,
                metrics=stage_metrics,
                models=models,
            )
            tmp = record_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, record_path)  # atomic: a stage is either on record or not
            emit(
                {
                    "type": "stage",
                    "stage": name,
                    "status": "succeeded",
                    "seconds": record["seconds"],
                    "metrics": stage_metrics,
                }
            )
        run.stages.append(record)
        done_w += weight
        emit(
            {
                "type": "progress",
                "stage": name,
                "stage_progress": 1.0,
                "progress": done_w / total_w,
                "message": "",
            }
        )

    history.write_csv(out / "history.csv")
    final = _final(run.metrics, run.kept)
    run.metrics["final"] = final
    gates = check_all(spec_gates(spec.gates), run.metrics)
    resolved = public_spec if public_spec is not None else spec.model_dump(mode="json")
    model_info = {
        "arch": spec.student.arch,
        "arch_kwargs": spec.student.arch_kwargs,
        "params": final["params"],
        "final": final["model"],
    }
    card = {
        "name": spec.name,
        "created_at": _now(),
        "spec": resolved,
        "model": model_info,
        "input": data.input_contract,
        "metrics": run.metrics,
        "artifacts": [a for a in _artifacts(out) if a["name"] != "model_card.json"],
        "versions": _versions(),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    report = {
        "name": spec.name,
        "spec": resolved,
        "device": str(device),
        "dataset": data.summary(),
        "metrics": run.metrics,
        "gates": gates,
        "gates_passed": all(g["passed"] for g in gates),
        "stages": run.stages,
        "artifacts": _artifacts(out),
        "wall_seconds": time.perf_counter() - started,
        "versions": _versions(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    emit({"type": "done", "report": report})
    return report


def _stage_models(stage: str) -> tuple[str, ...]:
    return {
        "teacher": ("teacher",),
        "baseline": ("baseline",),
        "distill": ("student",),
        "prune": ("pruned",),
        "quantize": ("quantized",),
    }.get(stage, ())
