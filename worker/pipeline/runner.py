"""Run a whole job: the stages of `STAGES.plan(spec)` in order (teacher -> [baseline] ->
distill -> [prune] -> [quantize] -> export), then the report.

Each stage measures the model it produced on the deployment runtime as soon as it finishes
and records itself under `<out>/.work/state/`, so a re-run over the same folder resumes
after the last finished stage (and, inside a training stage, after its last epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.pipeline import preflight, report
from worker.pipeline.context import StageContext, resolve_device
from worker.pipeline.data import DataBundle, data_dir, load_dataset
from worker.pipeline.history import HistoryLog, log_path
from worker.pipeline.limits import DataSettings, SpecLimits
from worker.pipeline.spec import JobSpec
from worker.pipeline.stages import STAGES, Stage, StageStatus
from worker.pipeline.state import EventFn, JobState


def run_pipeline(
    spec: JobSpec,
    out_dir: Path | str,
    *,
    on_event: EventFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    resume: bool = True,
    public_spec: dict[str, Any] | None = None,
    limits: SpecLimits | None = None,
    data_settings: DataSettings | None = None,
) -> dict[str, Any]:
    """Run `spec`, write artifacts and `report.json` into `out_dir`, return the report.

    Events go to `on_event` as dicts: `stage` (status changes), `progress` (overall 0..1),
    `log`, `metrics` and `history` (`row`: one epoch of a training run, every one of them).
    Raises a PipelineError subclass (with a `.code`) on failure.
    `public_spec` is what the report and model card show (the service passes the user's spec,
    without the server paths its uploads were resolved to). `limits` bound the models the
    spec describes (default: `SpecLimits()`); a spec past them fails before any is built.
    `data_settings` say how the data is read (workers, memory budget; default: from the host).
    """
    if spec.search is not None:
        from worker.pipeline.search import run_search

        limits = limits or SpecLimits()
        preflight.check_bounds([*preflight.students_of(spec), preflight.teacher_of(spec)], limits)
        preflight.check_candidates(spec, limits)
        kw = {"on_event": on_event, "should_cancel": should_cancel, "limits": limits}
        out = _output_folder(Path(out_dir), resume)
        return run_search(spec, out, public_spec=public_spec, **kw)
    started = time.perf_counter()
    limits = limits or SpecLimits()
    preflight.check_bounds([preflight.student_of(spec), preflight.teacher_of(spec)], limits)
    emit: EventFn = on_event or (lambda e: None)
    out = _output_folder(Path(out_dir), resume)
    plan = STAGES.plan(spec)
    progress = _Progress(spec, plan, emit)
    history = HistoryLog(log_path(out))  # a resumed job keeps its rows
    state = start_state(
        spec,
        out,
        emit=emit,
        should_cancel=should_cancel,
        on_progress=progress.report,
        history=history,
        public_spec=public_spec,
        limits=limits,
        data_settings=data_settings,
    )
    for stage in plan:
        run_stage(state, stage)
        progress.done(stage)
    history.write_csv(out / "history.csv")
    result = report.write(
        state, device=str(state.ctx.device), wall_seconds=time.perf_counter() - started
    )
    emit({"type": "done", "report": result})
    return result


def _output_folder(out: Path, resume: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out / ".work", ignore_errors=True)
    (out / ".work" / "state").mkdir(parents=True, exist_ok=True)
    return out


def start_state(
    spec: JobSpec,
    out: Path,
    *,
    emit: EventFn,
    should_cancel: Callable[[], bool] | None,
    on_progress: Callable[[str, float, str], None],
    history: HistoryLog,
    public_spec: dict[str, Any] | None,
    limits: SpecLimits,
    data_settings: DataSettings | None = None,
) -> JobState:
    """Seeds, device, the data, and the preflight: a spec that cannot work (a layer-name
    typo, an arch that does not fit the data) fails now, not after the teacher has trained.
    Search jobs start each phase (teacher, branch) from here too."""
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)

    def on_history(row: dict[str, Any]) -> None:
        history.add(row)
        emit({"type": "history", "row": row})

    ctx = StageContext(
        resolve_device(spec.device),
        out / ".work" / "checkpoints",
        on_progress,
        should_cancel,
        on_history=on_history,
    )
    data, record = load_data(spec, out, emit, data_settings)
    inits = preflight.preflight(
        spec,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        limits=limits,
        teacher=preflight.teacher_of(spec),
    )
    public = public_spec if public_spec is not None else spec.model_dump(mode="json")
    return JobState(spec, out, ctx, emit, data, public, inits=inits, records=[record])


def load_data(
    spec: JobSpec, out: Path, emit: EventFn, settings: DataSettings | None
) -> tuple[DataBundle, dict[str, Any]]:
    """The `data` stage: extract, decode (into the job's cache; an attempt that resumes finds
    it there), split and take the statistics, with its progress and its duration on the
    job's timeline like any stage. Returns the data and the stage's record."""
    record = {"name": "data", "status": StageStatus.RUNNING, "started_at": report.now()}
    emit({"type": "stage", "stage": "data", "status": StageStatus.RUNNING})
    t0 = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        emit(
            {
                "type": "progress",
                "stage": "data",
                "stage_progress": fraction,
                "progress": 0.0,  # the job's own progress counts its training stages
                "message": message,
            }
        )

    data = load_dataset(
        spec.dataset,
        spec.seed,
        workdir=data_dir(out),
        settings=settings,
        progress=progress,
    )
    metrics = data.summary()
    emit({"type": "log", "stage": "data", "message": f"dataset: {metrics}"})
    record.update(
        status=StageStatus.SUCCEEDED,
        finished_at=report.now(),
        seconds=time.perf_counter() - t0,
        metrics=metrics,
        models={},
    )
    emit(
        {
            "type": "stage",
            "stage": "data",
            "status": StageStatus.SUCCEEDED,
            "seconds": record["seconds"],
            "metrics": metrics,
        }
    )
    return data, record


def run_stage(state: JobState, stage: Stage) -> None:
    """Run one stage, or reload it when an earlier attempt finished it; its record (status,
    times, metrics, the metrics of the models it made) is written atomically at the end."""
    path = state.state_dir / f"{stage.name}.json"
    record = json.loads(path.read_text()) if path.exists() else None
    ctx = state.ctx.for_stage(stage.name)
    if record is not None:
        stage.run(state, ctx, True)
        state.metrics.update(record.get("models", {}))
        state.emit(
            {"type": "stage", "stage": stage.name, "status": StageStatus.SUCCEEDED, "resumed": True}
        )
        state.records.append(record)
        return
    state.ctx.check_cancel()
    record = {"name": stage.name, "status": StageStatus.RUNNING, "started_at": report.now()}
    state.emit({"type": "stage", "stage": stage.name, "status": StageStatus.RUNNING})
    t0 = time.perf_counter()
    metrics = stage.run(state, ctx, False)
    record.update(
        status=StageStatus.SUCCEEDED,
        finished_at=report.now(),
        seconds=time.perf_counter() - t0,
        metrics=metrics,
        models={k: v for k, v in state.metrics.items() if k in stage.models},
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # atomic: a stage is either on record or not
    state.records.append(record)
    state.emit(
        {
            "type": "stage",
            "stage": stage.name,
            "status": StageStatus.SUCCEEDED,
            "seconds": record["seconds"],
            "metrics": metrics,
        }
    )


class _Progress:
    """The job's progress, 0..1: each stage counts by its weight (about its epochs)."""

    def __init__(self, spec: JobSpec, plan: list[Stage], emit: EventFn) -> None:
        self.emit = emit
        self.weights = {s.name: max(s.weight(spec), 1e-3) for s in plan}
        self.total = sum(self.weights.values())
        self.finished = 0.0

    def report(self, stage: str, fraction: float, message: str) -> None:
        if fraction < 0:  # a log line, no progress change
            self.emit({"type": "log", "stage": stage, "message": message})
            return
        w = self.weights[stage]
        self.emit(
            {
                "type": "progress",
                "stage": stage,
                "stage_progress": fraction,
                "progress": min((self.finished + w * fraction) / self.total, 1.0),
                "message": message,
            }
        )

    def done(self, stage: Stage) -> None:
        self.finished += self.weights[stage.name]
        self.emit(
            {
                "type": "progress",
                "stage": stage.name,
                "stage_progress": 1.0,
                "progress": self.finished / self.total,
                "message": "",
            }
        )
