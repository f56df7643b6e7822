"""One branch of a search: one student, every recipe, pruning amount and quantizer for it.

Each candidate is recorded (`candidates/<key>.json`, with its ONNX file and, for float
models, its weights) the moment it is measured, and a branch run again skips what is on
record: a lost worker costs its branch only the step it was in (and inside a training step,
only the epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from worker.pipeline.distill import TeacherSignal
from worker.pipeline.history import HistoryLog
from worker.pipeline.limits import SpecLimits
from worker.pipeline.search import (
    Candidate,
    EventFn,
    SearchPlan,
    branch_dir,
    branch_spec,
    plan,
    quantize_spec,
    read_json,
    shared_dir,
    write_json,
)
from worker.pipeline.spec import JobSpec, PruneSpec, QuantizeSpec
from worker.pipeline.state import JobState


@dataclass
class _Branch:
    spec: JobSpec  # the search spec
    plan: SearchPlan
    index: int
    state: JobState  # this branch's student, data and folders
    progress: _Steps
    floats: dict[str, nn.Module] = field(default_factory=dict)  # key -> float model, this run
    # The student as the user wrote it (an upload id, not the worker's file), for the axes.
    public_student: Any = None
    kept: dict[str, str] = field(default_factory=dict)  # unpruned key -> distilled | baseline

    @property
    def dir(self) -> Path:
        return self.state.out

    def record_path(self, key: str) -> Path:
        return self.dir / "candidates" / f"{key}.json"

    def model_path(self, key: str, suffix: str) -> Path:
        return self.dir / "models" / f"{key}{suffix}"


class _Steps:
    """A branch's progress: its training steps weighted by their epochs."""

    def __init__(self, weights: dict[str, float], emit: EventFn) -> None:
        self.weights, self.emit = weights, emit
        self.total = max(sum(weights.values()), 1e-9)
        self.done = 0.0
        self.current = ""

    def start(self, step: str) -> None:
        self.current = step

    def finish(self, step: str) -> None:
        self.done += self.weights.get(step, 0.0)
        self.report("branch", 1.0, "")

    def report(self, stage: str, fraction: float, message: str) -> None:
        if fraction < 0:
            self.emit({"type": "log", "stage": "branch", "message": message})
            return
        w = self.weights.get(self.current, 0.0) * fraction if fraction < 1.0 else 0.0
        self.emit(
            {
                "type": "progress",
                "stage": "branch",
                "stage_progress": min((self.done + w) / self.total, 1.0),
                "progress": min((self.done + w) / self.total, 1.0),
                "message": f"{self.current} {message}".strip(),
            }
        )


def _weights(spec: JobSpec, p: SearchPlan, index: int) -> dict[str, float]:
    prune = spec.prune or PruneSpec()
    trains = p.students[index] is not None  # a branch compressing the teacher trains no student
    w = {"baseline": float(spec.distill.epochs)} if spec.distill.baseline and trains else {}
    for d in range(len(p.recipes)):
        w[f"d{d}"] = float(spec.distill.epochs) if trains else 0.0
        for i in range(1, len(p.prunes)):
            w[f"d{d}-p{i}"] = float(prune.finetune_epochs) + 1.0
    return w


def run_branch(
    spec: JobSpec,
    out: Path,
    index: int,
    *,
    on_event: EventFn | None = None,
    should_cancel=None,
    limits: SpecLimits | None = None,
    public_spec: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Make and measure every candidate of student `index`; returns their records. Needs the
    teacher phase's records under `out` (search.run_teacher). `public_spec`: the spec as the
    user sent it, whose student the candidates' axes show (default: `spec`'s)."""
    from worker.pipeline.runner import start_state

    emit: EventFn = on_event or (lambda e: None)
    p = plan(spec)
    steps = _Steps(_weights(spec, p, index), emit)
    bdir = branch_dir(out, index)
    (bdir / ".work" / "state").mkdir(parents=True, exist_ok=True)
    history = HistoryLog(bdir / "history.jsonl")
    state = start_state(
        branch_spec(spec, index),
        bdir,
        emit=emit,
        should_cancel=should_cancel,
        on_progress=steps.report,
        history=history,
        public_spec=None,
        limits=limits or SpecLimits(),
    )
    state.signal = _teacher_signal(spec, out, state)
    if state.compress_only and state.teacher is None:  # its own model is the one to prune
        _load_teacher(spec, out, state)
    branch = _Branch(spec, p, index, state, steps)
    branch.public_student = _public_student(public_spec, index, p.candidates(index)[0])
    baseline = _baseline(branch)
    for d in range(len(p.recipes)):
        _recipe(branch, d, baseline)
    return [read_json(branch.record_path(c.key)) for c in p.candidates(index)]


def _public_student(public_spec: dict[str, Any] | None, index: int, first: Candidate) -> Any:
    if public_spec is None:
        return first.axes["student"]
    students = (public_spec.get("search") or {}).get("student") or [public_spec.get("student")]
    return students[index]


def _teacher_signal(spec: JobSpec, out: Path, state: JobState) -> TeacherSignal:
    """The teacher as the students see it: the logits cached by the teacher phase, or the
    teacher itself (augmentation or a feature loss need it online)."""
    import torch

    logits = shared_dir(out) / "logits.npy"
    if logits.exists():
        # Memory-mapped (copy-on-write): rows are read per batch, not held whole.
        return TeacherSignal(torch.from_numpy(np.load(logits, mmap_mode="c")), None)
    return TeacherSignal(None, _load_teacher(spec, out, state).logits_fn)


def _load_teacher(spec: JobSpec, out: Path, state: JobState):
    """The teacher the teacher phase trained (its shared weights), or the uploaded one."""
    from worker.pipeline import teacher as teachers
    from worker.pipeline.spec import TrainedTeacher

    t = spec.teacher
    if isinstance(t, TrainedTeacher):
        from worker.pipeline.teacher import load_safetensors

        path = shared_dir(out) / "teacher.safetensors"
        model = load_safetensors(path, t.arch, t.arch_kwargs, state.data).to(state.ctx.device)
        state.teacher = teachers.TeacherResult(model, model, None, {}, t.arch, t.arch_kwargs)
    else:
        state.teacher = teachers.run(t, state.data, state.ctx.for_stage("teacher"), spec.seed)
    return state.teacher


def _baseline(branch: _Branch) -> nn.Module | None:
    """The student trained on labels alone, once per branch (it does not depend on the
    recipe): what every distilled student is compared with."""
    from worker.pipeline.distill import train_student

    s, state = branch.spec, branch.state
    if not s.distill.baseline or state.compress_only:
        return None
    path = state.state_dir / "baseline.safetensors"
    if path.exists():
        return state.load_student("baseline")
    branch.progress.start("baseline")
    ctx = state.ctx.for_step("baseline", "baseline")
    student = state.spec.student
    model, _ = train_student(
        student, s.distill, state.data, ctx, s.seed, signal=None, tag=f"s{branch.index}:baseline"
    )
    state.save_student("baseline", model)
    branch.progress.finish("baseline")
    return model


def _recipe(branch: _Branch, d: int, baseline: nn.Module | None) -> None:
    """One (temperature, alpha): the distilled student, kept or not against the baseline, then
    its pruned descendants; every model measured as float and as each quantizer makes it."""
    p, i = branch.plan, branch.index
    for c in p.candidates(i):
        if c.recipe != d or c.quant != 0:
            continue
        if branch.record_path(c.key).exists() and all(
            branch.record_path(q.key).exists() for q in _quantized_of(p, c)
        ):
            continue  # on record, and so are its quantized versions
        model = _distilled(branch, d, c, baseline) if c.prune == 0 else _pruned(branch, c)
        _measure_float(branch, c, model)
        for q in _quantized_of(p, c):
            _measure_quantized(branch, q, c)


def _quantized_of(p: SearchPlan, c: Candidate) -> list[Candidate]:
    return [q for q in p.candidates(c.branch) if q.parent == c.key and q.quant > 0]


def _distilled(branch: _Branch, d: int, c: Candidate, baseline: nn.Module | None) -> nn.Module:
    from worker.pipeline import distill as distillation

    s, state = branch.spec, branch.state
    if state.compress_only:  # the unpruned model is the teacher itself
        branch.kept[c.key] = "teacher"
        return state.start_model()
    t, a = branch.plan.recipes[d]
    dspec = s.distill.model_copy(update={"temperature": t, "alpha": a})
    branch.progress.start(f"d{d}")
    ctx = state.ctx.for_step("distill", f"d{d}")
    model, _ = distillation.train_student(
        state.spec.student,
        dspec,
        state.data,
        ctx,
        s.seed,
        signal=state.signal,
        teacher=state.teacher,
        tag=f"s{branch.index}-d{d}:distill",
    )
    if baseline is not None:
        state.models["baseline"] = baseline
        selection = state.keep_better(model)  # on the validation split, as a plain job does
        model = state.models["kept"]
        ctx.log(f"{c.key}: kept the {selection['kept']} student")
    branch.kept[c.key] = state.kept if baseline is not None else "distilled"
    branch.progress.finish(f"d{d}")
    return model


def _pruned(branch: _Branch, c: Candidate) -> nn.Module:
    """Prune the candidate's parent further to its amount, and fine-tune it with its recipe."""
    from worker.pipeline import prune as pruning

    s, state, p = branch.spec, branch.state, branch.plan
    method, amount = p.prunes[c.prune]
    assert c.parent is not None
    parent = _float_model(branch, c.parent)
    done = p.prunes[p.get(c.parent).prune][1]  # what the parent was pruned by already
    base = s.prune or PruneSpec()
    step = pruning.step_amount(method, done, amount)
    pspec = base.model_copy(update={"method": method, "amount": step, "steps": 1})
    t, a = p.recipes[c.recipe]
    dspec = s.distill.model_copy(update={"temperature": t, "alpha": a})
    branch.progress.start(f"d{c.recipe}-p{c.prune}")
    ctx = state.ctx.for_step("prune", c.key)
    model, _ = pruning.run(
        _copy(parent), state.data, pspec, dspec, state.signal, ctx, s.seed, tag=f"{c.key}:ft"
    )
    branch.progress.finish(f"d{c.recipe}-p{c.prune}")
    return model


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _float_model(branch: _Branch, key: str) -> nn.Module:
    """A float candidate made in this run, or loaded from its recorded weights."""
    if key not in branch.floats:
        state = branch.state
        path = branch.model_path(key, ".safetensors")
        from worker.pipeline.teacher import load_safetensors

        arch, kwargs = state.subject_arch()
        assert arch is not None
        model = load_safetensors(path, arch, kwargs, state.data)
        branch.floats[key] = model.to(state.ctx.device)
    return branch.floats[key]


def _measure_float(branch: _Branch, c: Candidate, model: nn.Module) -> None:
    from worker.pipeline.archs import count_params
    from worker.pipeline.export import export_onnx, export_safetensors
    from worker.pipeline.prune import count_macs

    state = branch.state
    branch.floats[c.key] = model
    arch, kwargs = state.subject_arch()
    assert arch is not None
    export_safetensors(
        model, _ensure(branch.model_path(c.key, ".safetensors")), arch=arch, arch_kwargs=kwargs
    )
    onnx = export_onnx(model, state.data.x_test, branch.model_path(c.key, ".onnx"))
    macs = count_macs(model.eval(), state.data.x_train[:1].to(state.ctx.device))
    _write(branch, c, onnx, count_params(model), macs)


def _measure_quantized(branch: _Branch, q: Candidate, parent: Candidate) -> None:
    from worker.pipeline import quantize as quantization

    s, state = branch.spec, branch.state
    qspec = quantize_spec(s, branch.plan, q)
    src = branch.model_path(parent.key, ".onnx")
    dst = branch.model_path(q.key, ".onnx")
    if quantization.QUANTIZERS.get(qspec.method).trains:
        _quantize_aware(branch, q, parent, qspec, dst)
    else:
        calib = state.data.calibration(qspec.calibration_samples, s.seed)
        quantization.run(src, dst, calib, qspec)
    record = read_json(branch.record_path(parent.key))
    bits = qspec.method in ("int8_static", "qat")  # the widths weight_bits decides
    extra = {"weight_bits": quantization.weight_bits(qspec)[0]} if bits else {}
    _write(branch, q, dst, record["metrics"]["params"], record["metrics"]["macs"], extra)


def _quantize_aware(
    branch: _Branch, q: Candidate, parent: Candidate, qspec: QuantizeSpec, dst: Path
) -> None:
    """A `qat` candidate: its float parent fine-tuned with fake quantization against the
    teacher (worker.pipeline.qat), with the candidate's own recipe."""
    from worker.pipeline import qat

    s, state, p = branch.spec, branch.state, branch.plan
    t, a = p.recipes[q.recipe]
    dspec = s.distill.model_copy(update={"temperature": t, "alpha": a})
    ctx = state.ctx.for_step("quantize", q.key)
    model = _float_model(branch, parent.key)
    assert state.signal is not None
    qat.run(model, state.data, qspec, dspec, state.signal, ctx, s.seed, dst, tag=f"{q.key}:qat")


def _write(
    branch: _Branch, c: Candidate, onnx: Path, params: int, macs: int, extra: dict | None = None
) -> None:
    from worker.pipeline.evaluate import measured

    state = branch.state
    metrics, correct = measured(
        onnx, state.data.x_test, state.data.y_test, state.spec.evaluate, params
    )
    metrics["macs"] = int(macs)
    metrics.update(extra or {})
    correct_path = branch.model_path(c.key, ".correct.npy")
    np.save(_ensure(correct_path), correct)
    rel = lambda path: str(path.relative_to(branch.dir))  # noqa: E731
    weights = branch.model_path(c.key, ".safetensors")
    record = {
        "key": c.key,
        "branch": c.branch,
        "parent": c.parent,
        "axes": {**c.axes, "student": branch.public_student},
        "metrics": metrics,
        "kept": branch.kept.get(c.key),
        "files": {
            "onnx": rel(onnx),
            "safetensors": rel(weights) if c.quant == 0 else None,
            "correct": rel(correct_path),
        },
    }
    write_json(branch.record_path(c.key), record)
    state.emit({"type": "candidate", "candidate": record})


def _ensure(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
