"""Search jobs: every combination of the spec's `search` axes is a candidate, and the job
hands over the best one that passes the gates, with the Pareto front of all of them.

Nothing is computed twice. The teacher is trained (or loaded) once and its logits cached
once (`run_teacher`). Each student is a branch (`run_branch`): trained without a teacher once
(the baseline), distilled once per (temperature, alpha), then pruned along each method's
amounts in ascending order, each amount starting from the one before it (the 0.5 model is
the 0.3 model pruned further, and fine-tuned), and each model is quantized by each method.
Branches share nothing but the teacher, so the service runs them on as many workers as it
has. `finalize` measures nothing new: it reads every candidate's record, draws the front,
chooses, and exports the chosen model.

Layout under the job's folder: `.work/shared/` (the teacher), `.work/branches/<i>/` (one
branch: its models, checkpoints, a record per finished candidate), then the usual artifacts
plus `candidates.json` and `pareto.png`. Each phase resumes from what is on record.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distillery_contract.states import StageStatus
from worker.pipeline.spec import JobSpec, PruneSpec, QuantizeSpec, StudentSpec

EventFn = Callable[[dict[str, Any]], None]


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    key: str  # s<student>-d<recipe>-p<prune>-q<quantizer>: stable, and fine in a file name
    branch: int  # the student: one branch of the search
    recipe: int  # which (temperature, alpha)
    prune: int  # index into SearchPlan.prunes (0: not pruned)
    quant: int  # index into SearchPlan.quants (0: float)
    parent: str | None  # the candidate it was derived from (its float model, or the unpruned)
    axes: dict[str, Any] = field(hash=False)


@dataclass
class SearchPlan:
    students: list[StudentSpec | None]  # None: the teacher itself, compressed (no student)
    recipes: list[tuple[float, float]]  # (temperature, alpha)
    prunes: list[tuple[str | None, float]]  # (method, amount); (None, 0.0) first
    quants: list[str | None]  # quantizers; None (float) first
    objective: str
    # int8_static's calibration method for each entry of `quants` (None: not calibrated).
    calibrations: list[str | None] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.students) * len(self.recipes) * len(self.prunes) * len(self.quants)

    def candidates(self, branch: int | None = None) -> list[Candidate]:
        branches = range(len(self.students)) if branch is None else [branch]
        grid = itertools.product(
            branches, range(len(self.recipes)), range(len(self.prunes)), range(len(self.quants))
        )
        return [self._candidate(*at) for at in grid]

    def get(self, key: str) -> Candidate:
        s, d, p, q = (int(part[1:]) for part in key.split("-"))
        return self._candidate(s, d, p, q)

    def _candidate(self, s: int, d: int, p: int, q: int) -> Candidate:
        (t, a), (method, amount) = self.recipes[d], self.prunes[p]
        if q > 0:
            parent = key_of(s, d, p, 0)
        elif p > 0:
            # Pruned from the previous amount of the same method, or from the unpruned model.
            prev = p - 1 if p > 1 and self.prunes[p - 1][0] == method else 0
            parent = key_of(s, d, prev, 0)
        else:
            parent = None
        axes = {
            "student": public_student(self.students[s]),
            "distill.temperature": t,
            "distill.alpha": a,
            "prune.method": method,
            "prune.amount": amount,
            "quantize.method": self.quants[q],
            "quantize.calibration": self.calibrations[q] if self.calibrations else None,
        }
        return Candidate(key_of(s, d, p, q), s, d, p, q, parent, axes)


def public_student(student: StudentSpec | None) -> dict[str, Any] | None:
    """A student as a candidate's axes show it: without the file path of its starting
    weights (on the service, a path on the worker)."""
    if student is None:
        return None
    return student.model_dump(mode="json", exclude={"init": {"path"}})


def subject_arch(spec: JobSpec, student: StudentSpec | None) -> tuple[str, dict[str, Any]]:
    """The arch of a branch's models: its student's, or the teacher's when the branch
    compresses the teacher itself (a search allows that only for teachers with an arch)."""
    model = student if student is not None else spec.teacher
    arch = getattr(model, "arch", None)
    assert arch is not None, "a search compresses only a teacher with an arch"
    return arch, dict(getattr(model, "arch_kwargs", {}))


def key_of(s: int, d: int, p: int, q: int) -> str:
    return f"s{s}-d{d}-p{p}-q{q}"


def _values(axis: list | None, default: Any) -> list:
    """An axis's values without repeats (in the order given), or the plain spec's value."""
    if axis is None:
        return [default]
    return list(dict.fromkeys(axis))


def plan(spec: JobSpec) -> SearchPlan:
    """The candidates of a search spec. The unpruned and the float model of every student are
    candidates whether or not the axes name them: they are made anyway."""
    s = spec.search
    assert s is not None
    students = s.student or [spec.student]
    temps = _values(s.distill_temperature, spec.distill.temperature)
    alphas = _values(s.distill_alpha, spec.distill.alpha)
    base_prune = spec.prune or PruneSpec()
    amounts = sorted(
        {a for a in _values(s.prune_amount, base_prune.amount if spec.prune else 0.0) if a > 0}
    )
    methods = _values(s.prune_method, base_prune.method)
    quants, calibrations = _quantizers(spec)
    return SearchPlan(
        students=students,
        recipes=list(itertools.product(temps, alphas)),
        prunes=[(None, 0.0)] + [(m, a) for m in methods for a in amounts],
        quants=quants,
        objective=spec.goal,
        calibrations=calibrations,
    )


def _quantizers(spec: JobSpec) -> tuple[list[str | None], list[str | None]]:
    """The quantizers to try, float first, and each one's calibration: int8_static once per
    calibration method on the axis (the only quantizer that calibrates), the others once."""
    s = spec.search
    assert s is not None
    base = spec.quantize or QuantizeSpec()
    methods = _values(s.quantize_method, spec.quantize.method if spec.quantize else None)
    calibrations = _values(s.quantize_calibration, base.calibration)
    quants: list[str | None] = [None]
    cals: list[str | None] = [None]
    for method in (m for m in methods if m is not None):
        for calibration in calibrations if method == "int8_static" else [None]:
            quants.append(method)
            cals.append(calibration)
    return quants, cals


def quantize_spec(spec: JobSpec, p: SearchPlan, c: Candidate) -> QuantizeSpec:
    """The quantize settings a candidate was made with: the spec's, with its axes' method
    and calibration."""
    update: dict[str, Any] = {"method": p.quants[c.quant]}
    if p.calibrations and p.calibrations[c.quant] is not None:
        update["calibration"] = p.calibrations[c.quant]
    return (spec.quantize or QuantizeSpec()).model_copy(update=update)


def branch_spec(spec: JobSpec, index: int) -> JobSpec:
    """The plain spec one branch trains with: its student, the spec's other settings."""
    return spec.model_copy(update={"student": plan(spec).students[index], "search": None})


# --- records on disk -------------------------------------------------------------------------


def shared_dir(out: Path) -> Path:
    return out / ".work" / "shared"


def branch_dir(out: Path, index: int) -> Path:
    return out / ".work" / "branches" / str(index)


def write_json(path: Path, value: Any) -> None:
    """Write then rename: a record is either there whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def candidate_records(out: Path, plan_: SearchPlan) -> dict[str, dict[str, Any]]:
    """Every candidate on record so far, by key."""
    found = {}
    for c in plan_.candidates():
        record = read_json(branch_dir(out, c.branch) / "candidates" / f"{c.key}.json")
        if record is not None:
            found[c.key] = record
    return found


# --- the teacher phase -----------------------------------------------------------------------


def run_teacher(
    spec: JobSpec,
    out: Path,
    *,
    on_event: EventFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    public_spec: dict[str, Any] | None = None,
    limits: Any = None,
) -> dict[str, Any]:
    """Train or load the teacher once for the whole search, measure it, cache its logits (when
    inputs are not augmented), and check every student fits the data. Returns its record."""
    from worker.pipeline import preflight
    from worker.pipeline.history import HistoryLog
    from worker.pipeline.limits import SpecLimits
    from worker.pipeline.runner import run_stage, start_state
    from worker.pipeline.stages import STAGES

    shared = shared_dir(out)
    record = read_json(shared / "teacher.json")
    if record is not None:
        return record
    emit: EventFn = on_event or (lambda e: None)
    limits = limits or SpecLimits()
    p = plan(spec)
    (out / ".work" / "state").mkdir(parents=True, exist_ok=True)
    state = start_state(
        branch_spec(spec, 0),
        out,
        emit=emit,
        should_cancel=should_cancel,
        on_progress=_stage_progress(emit),
        history=HistoryLog(out / ".work" / "history.jsonl"),
        public_spec=public_spec,
        limits=limits,
    )
    for i in range(1, len(p.students)):  # the first was checked by start_state
        shape, classes = state.data.input_shape, state.data.num_classes
        preflight.preflight(
            branch_spec(spec, i),
            input_shape=shape,
            num_classes=classes,
            limits=limits,
            teacher=preflight.teacher_of(spec),
        )
    run_stage(state, STAGES.get("teacher"))
    return _share_teacher(spec, state, shared, p)


def _share_teacher(spec: JobSpec, state: Any, shared: Path, p: SearchPlan) -> dict[str, Any]:
    from worker.pipeline.spec import TrainedTeacher

    shared.mkdir(parents=True, exist_ok=True)
    signal = state.teacher_signal()
    if signal.logits is not None:
        np.save(shared / "logits.npy", signal.logits.numpy())
    if isinstance(spec.teacher, TrainedTeacher):
        (shared / "teacher.safetensors").write_bytes(
            (state.state_dir / "teacher.safetensors").read_bytes()
        )
    np.save(shared / "teacher_correct.npy", np.load(state.correct_path("teacher")))
    # The file it was measured from: the final choice times candidates against it.
    shutil.copyfile(state.teacher_onnx(), shared / "teacher.onnx")
    record = {
        "metrics": state.metrics["teacher"],
        "logits_cached": signal.logits is not None,
        "candidates": p.size,
        "branches": len(p.students),
        "input_contract": state.data.input_contract,
        "dataset": state.data.summary(),
        "device": str(state.ctx.device),
        "stage": state.records[-1],
    }
    write_json(shared / "teacher.json", record)
    return record


def _stage_progress(emit: EventFn) -> Callable[[str, float, str], None]:
    def report(stage: str, fraction: float, message: str) -> None:
        if fraction < 0:
            emit({"type": "log", "stage": stage, "message": message})
        else:
            emit(
                {
                    "type": "progress",
                    "stage": stage,
                    "stage_progress": fraction,
                    "progress": fraction,
                    "message": message,
                }
            )

    return report


def run_search(
    spec: JobSpec,
    out: Path,
    *,
    on_event: EventFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    public_spec: dict[str, Any] | None = None,
    limits: Any = None,
) -> dict[str, Any]:
    """The whole search in this process: the teacher, each branch in turn, then the choice.
    (The service runs the same three phases, the branches on many workers.)"""
    from worker.pipeline.branch import run_branch
    from worker.pipeline.finalize import finalize

    started = time.perf_counter()
    emit: EventFn = on_event or (lambda e: None)
    kw = {"on_event": emit, "should_cancel": should_cancel, "limits": limits}
    run_teacher(spec, out, public_spec=public_spec, **kw)
    with _stage(emit, "search"):
        for i in range(len(plan(spec).students)):
            if should_cancel is not None and should_cancel():
                from worker.pipeline.errors import Cancelled

                raise Cancelled("cancelled during the search")
            run_branch(spec, out, i, public_spec=public_spec, **kw)
    with _stage(emit, "export"):
        return finalize(spec, out, on_event=emit, public_spec=public_spec, started=started)


@contextmanager
def _stage(emit: EventFn, name: str):
    """Stage events around a phase, as the stages of a plain job send them."""
    emit({"type": "stage", "stage": name, "status": StageStatus.RUNNING})
    t0 = time.perf_counter()
    yield
    emit(
        {
            "type": "stage",
            "stage": name,
            "status": StageStatus.SUCCEEDED,
            "seconds": time.perf_counter() - t0,
        }
    )
