"""What the stages of one job share: the spec, the data, the models made so far and their
measured metrics, and the job's folders. Stages read and add to it; the runner records it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from worker.pipeline.context import StageContext
from worker.pipeline.data import DataBundle
from worker.pipeline.distill import TeacherSignal
from worker.pipeline.init_weights import InitPlan
from worker.pipeline.spec import JobSpec
from worker.pipeline.teacher import TeacherResult

EventFn = Callable[[dict[str, Any]], None]


@dataclass
class JobState:
    spec: JobSpec
    out: Path  # where the artifacts go
    ctx: StageContext  # the job's root context; each stage gets its own from it
    emit: EventFn
    data: DataBundle
    public_spec: dict[str, Any]  # what the report and model card show as the spec
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> its numbers
    records: list[dict[str, Any]] = field(default_factory=list)  # each stage as it ran
    teacher: TeacherResult | None = None
    signal: TeacherSignal | None = None
    # Models by role: baseline (no teacher), kept (the student that goes on), pruned.
    models: dict[str, nn.Module] = field(default_factory=dict)
    kept: str = "distilled"  # which student went on: "distilled" or "baseline"
    # What each model given starting weights loads from them (field -> plan), from the preflight.
    inits: dict[str, InitPlan] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.out / ".work"

    @property
    def state_dir(self) -> Path:
        """Each finished stage's record and models: what a resumed job starts from."""
        return self.work / "state"

    # -- measuring --------------------------------------------------------------------------

    def measure_onnx(self, key: str, path: Path, params: int | None) -> dict[str, Any]:
        """The metrics contract for the model at `path`, on the deployment runtime; which
        test samples it got right goes to `.work/state/correct/` (paired intervals)."""
        import numpy as np

        from worker.pipeline.evaluate import measured

        m, correct = measured(path, self.data.x_test, self.data.y_test, self.spec.evaluate, params)
        self.correct_path(key).parent.mkdir(parents=True, exist_ok=True)
        np.save(self.correct_path(key), correct)
        self.metrics[key] = m
        self.emit({"type": "metrics", "model": key, "metrics": m})
        return m

    def correct_path(self, key: str) -> Path:
        return self.state_dir / "correct" / f"{key}.npy"

    def measure_module(self, key: str, model: nn.Module) -> dict[str, Any]:
        from worker.pipeline.archs import count_params
        from worker.pipeline.export import export_onnx

        path = export_onnx(model, self.data.x_test, self.work / f"{key}.onnx")
        return self.measure_onnx(key, path, count_params(model))

    # -- models kept across attempts (safetensors, never pickles) ----------------------------

    def save_model(self, key: str, model: nn.Module, arch: str, arch_kwargs: dict) -> None:
        from worker.pipeline.export import export_safetensors

        path = self.state_dir / f"{key}.safetensors"
        export_safetensors(model, path, arch=arch, arch_kwargs=arch_kwargs)

    def load_model(self, key: str, arch: str, arch_kwargs: dict) -> nn.Module:
        from worker.pipeline.teacher import load_safetensors

        path = self.state_dir / f"{key}.safetensors"
        return load_safetensors(path, arch, arch_kwargs, self.data).to(self.ctx.device)

    @property
    def compress_only(self) -> bool:
        """No student: the teacher itself is what the job prunes and quantizes."""
        return self.spec.student is None

    def subject_arch(self) -> tuple[str | None, dict]:
        """The arch of the models the job makes: the student's, or in a compress-only job the
        teacher's (None for a teacher without one: ONNX, TorchScript)."""
        if self.spec.student is not None:
            return self.spec.student.arch, self.spec.student.arch_kwargs
        assert self.teacher is not None
        return self.teacher.arch, self.teacher.arch_kwargs or {}

    def save_student(self, key: str, model: nn.Module) -> None:
        arch, kwargs = self.subject_arch()
        assert arch is not None
        self.save_model(key, model, arch, kwargs)

    def load_student(self, key: str) -> nn.Module:
        arch, kwargs = self.subject_arch()
        assert arch is not None
        return self.load_model(key, arch, kwargs)

    def record_of(self, stage: str) -> dict[str, Any]:
        return json.loads((self.state_dir / f"{stage}.json").read_text())

    # -- shared between stages ----------------------------------------------------------------

    def teacher_signal(self) -> TeacherSignal:
        """The teacher as the students see it (cached logits when allowed), made once."""
        from worker.pipeline.distill import teacher_signal

        if self.signal is None:
            assert self.teacher is not None
            self.signal = teacher_signal(self.teacher, self.data, self.spec.distill, self.ctx)
        return self.signal

    def keep_better(self, distilled: nn.Module) -> dict[str, Any]:
        """Keep the better of the distilled student and the no-teacher baseline, judged on
        the validation split (never the test split, which only measures). Ties go to the
        distilled student: it also learned the teacher's soft targets."""
        from worker.pipeline.train import accuracy

        baseline, data = self.models.get("baseline"), self.data
        self.kept, self.models["kept"] = "distilled", distilled
        if self.spec.distill.keep != "better" or baseline is None or data.x_val is None:
            return {"kept": self.kept}
        val = {
            "distilled": accuracy(distilled, data.x_val, data.y_val, self.ctx.device),
            "baseline": accuracy(baseline, data.x_val, data.y_val, self.ctx.device),
        }
        if val["baseline"] > val["distilled"]:
            self.kept, self.models["kept"] = "baseline", baseline
        return {
            "kept": self.kept,
            "val_accuracy_distilled": val["distilled"],
            "val_accuracy_baseline": val["baseline"],
        }

    def start_model(self) -> nn.Module:
        """What pruning starts from: the kept student, or in a compress-only job a copy of
        the teacher (which stays as it was: it is measured, exported, and fine-tuned against)."""
        import copy

        if "kept" in self.models:
            return self.models["kept"]
        assert self.teacher is not None and self.teacher.module is not None
        return copy.deepcopy(self.teacher.module)

    def float_of(self, key: str) -> nn.Module | None:
        """The float model behind a reported model: a quantized one's is the last float one.
        None: the teacher of a compress-only job has no torch module (an ONNX upload)."""
        if key == "quantized":
            return self.final_float()[1]
        if key == "teacher":
            assert self.teacher is not None
            return self.teacher.module
        return self.models["pruned"] if key == "pruned" else self.models["kept"]

    def final_float(self) -> tuple[str, nn.Module | None]:
        """The last float model made: pruned if the job prunes, else the kept student, else
        (compress-only) the teacher."""
        for key in ("pruned", "kept"):
            if key in self.models:
                return key, self.models[key]
        return "teacher", self.float_of("teacher")

    def teacher_onnx(self) -> Path:
        """The teacher as ONNX: the uploaded file, or the export it was measured from."""
        assert self.teacher is not None
        if self.teacher.onnx_path is not None:
            return self.teacher.onnx_path
        path = self.work / "teacher.onnx"
        if not path.exists():
            from worker.pipeline.export import export_onnx

            assert self.teacher.module is not None
            export_onnx(self.teacher.module, self.data.x_test, path)
        return path
