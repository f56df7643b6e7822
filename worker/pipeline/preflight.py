"""Everything about a spec that can be checked before compute, in one place.

POST /v1/jobs runs it before queueing and `run_pipeline` before the teacher stage, so a spec
that asks for too much, whose archs do not fit the data, or whose feature-loss layer is a
typo fails in well under a second instead of after the teacher has trained. Models are
built on PyTorch's meta device only: shapes and counts, no memory, no weights.

Order matters: the structural bounds (`limits.check_structure`) hold before anything is
built, since building an unbounded spec is itself the cost to avoid.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.pipeline.archs import check_arch, count_layers, count_params
from worker.pipeline.errors import ModelLoadError, SpecError
from worker.pipeline.init_weights import Header, InitPlan, file_header, plan_init
from worker.pipeline.limits import SpecLimits, check_structure
from worker.pipeline.losses import FEATURE_LOSSES
from worker.pipeline.spec import (
    FeatureLossSpec,
    JobSpec,
    SafetensorsInit,
    SafetensorsTeacher,
    TrainedTeacher,
    UploadedInit,
)


@dataclass(frozen=True)
class ArchRef:
    """A model known by arch name, and how messages name it and its arguments."""

    field: str  # e.g. "student.arch", or "teacher.id" for an uploaded safetensors teacher
    arch: str
    kwargs: dict[str, Any]
    kwargs_field: str  # e.g. "student.arch_kwargs"


def student_of(spec: JobSpec) -> ArchRef | None:
    """The student's arch; None for a compress-only job (no student)."""
    s = spec.student
    if s is None:
        return None
    return ArchRef("student.arch", s.arch, s.arch_kwargs, "student.arch_kwargs")


def students_of(spec: JobSpec) -> list[ArchRef]:
    """Every student the spec trains: a search's `search.student` list, else `student`
    (the teacher compressed by itself trains none)."""
    if spec.search is None or spec.search.student is None:
        one = student_of(spec)
        return [] if one is None else [one]
    return [
        ArchRef(
            f"search.student[{i}].arch", s.arch, s.arch_kwargs, f"search.student[{i}].arch_kwargs"
        )
        for i, s in enumerate(spec.search.student)
        if s is not None
    ]


def check_candidates(spec: JobSpec, limits: SpecLimits) -> None:
    """A search may not ask for more candidates than the operator allows."""
    if spec.search is None:
        return
    from worker.pipeline.search import plan

    p = plan(spec)
    if p.size > limits.max_candidates:
        raise SpecError(
            f"search: {p.size} candidates ({len(p.students)} students x {len(p.recipes)} "
            f"recipes x {len(p.prunes)} pruning choices x {len(p.quants)} quantizers); at "
            f"most {limits.max_candidates} are allowed"
        )


def teacher_of(spec: JobSpec) -> ArchRef | None:
    """The teacher when the spec itself names its arch (trained, or safetensors by path)."""
    t = spec.teacher
    if isinstance(t, TrainedTeacher | SafetensorsTeacher):
        return ArchRef("teacher.arch", t.arch, t.arch_kwargs, "teacher.arch_kwargs")
    return None


def check_bounds(models: Sequence[ArchRef | None], limits: SpecLimits) -> None:
    """The structural bounds of every model's arch_kwargs (None: a model without an arch,
    skipped); nothing is built."""
    for ref in models:
        if ref is not None:
            check_structure(ref.kwargs, where=ref.kwargs_field, limits=limits)


@dataclass(frozen=True)
class ArchFacts:
    layers: int
    params: int


@functools.lru_cache(maxsize=1024)
def _facts(arch: str, kwargs_json: str, shape: tuple[int, ...], classes: int) -> ArchFacts | str:
    """Counts of a meta-built model, or why it cannot take this input. Building, even on the
    meta device, is most of a POST's cost; specs repeat the same few (arch, kwargs, shape),
    so the verdict is cached per process (the arch registry is fixed at import)."""
    try:
        model = check_arch(arch, json.loads(kwargs_json), shape, classes)
    except Exception as e:  # DatasetIncompatible, or the builder refusing its arguments
        return str(e)
    return ArchFacts(count_layers(model), count_params(model))


def arch_facts(
    arch: str, kwargs: dict[str, Any], shape: Sequence[int], classes: int
) -> ArchFacts | str:
    return _facts(arch, json.dumps(kwargs, sort_keys=True), tuple(shape), classes)


def check_model(ref: ArchRef, shape: Sequence[int], classes: int, limits: SpecLimits) -> None:
    """The arch fits the data, and its layer and parameter counts are within `limits`.
    Call `check_bounds` first: this builds the model (on the meta device)."""
    facts = arch_facts(ref.arch, ref.kwargs, shape, classes)
    where = f"{ref.field}: {ref.arch!r}"
    if isinstance(facts, str):
        raise SpecError(f"{where} does not fit input {list(shape)} with {classes} classes: {facts}")
    if facts.layers > limits.max_layers:
        raise SpecError(
            f"{where} builds {facts.layers} layers with weights; "
            f"at most {limits.max_layers} are allowed"
        )
    if facts.params > limits.max_params:
        raise SpecError(
            f"{where} builds {facts.params:,} parameters for input {list(shape)} and "
            f"{classes} classes; at most {limits.max_params:,} are allowed"
        )


# --- feature losses ------------------------------------------------------------------------


def feature_layer(model: nn.Module, name: str, role: str) -> nn.Module:
    """The layer a feature loss names (`role`: student or teacher), or an error listing the
    model's layers."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in model.named_modules() if n][:40]
        raise SpecError(
            f"distill.feature.{role}_layer: no layer {name!r}; layers: {', '.join(known)}"
        ) from None


def feature_loss(spec: FeatureLossSpec, s: Any, t: Any) -> nn.Module:
    """The feature loss between outputs `s` (student) and `t` (teacher) of the named layers;
    refuses outputs it cannot compare. Works on meta tensors."""
    if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor) or s.ndim != t.ndim:
        raise SpecError(
            f"distill.feature: layers {spec.student_layer!r} and {spec.teacher_layer!r} give outputs "
            "of different kinds; pick two conv layers (N,C,H,W) or two linear layers (N,D)"
        )
    try:
        return FEATURE_LOSSES.get(spec.loss)(s.shape[1], t.shape[1], conv=s.ndim == 4)
    except ValueError as e:
        raise SpecError(f"distill.feature: {e}") from None


def _layer_output(ref: ArchRef, layer: str, role: str, shape: Sequence[int], classes: int) -> Any:
    model = check_arch(ref.arch, ref.kwargs, shape, classes)  # meta, eval mode
    out: dict[str, Any] = {}
    handle = feature_layer(model, layer, role).register_forward_hook(
        lambda _m, _i, o: out.setdefault("value", o)
    )
    with torch.no_grad():
        model(torch.empty(2, *shape, device="meta"))
    handle.remove()
    return out.get("value")


def check_feature(
    spec: FeatureLossSpec,
    student: ArchRef,
    teacher: ArchRef | None,
    shape: Sequence[int],
    classes: int,
) -> None:
    """Both layers exist and give outputs the loss can compare. Without a teacher arch (a
    TorchScript upload) only the student's layer is checked; the distill stage checks the rest."""
    s = _layer_output(student, spec.student_layer, "student", shape, classes)
    if teacher is None:
        return
    t = _layer_output(teacher, spec.teacher_layer, "teacher", shape, classes)
    with torch.device("meta"):
        feature_loss(spec, s, t)


# --- starting weights ----------------------------------------------------------------------


@dataclass(frozen=True)
class InitRef:
    """Starting weights a spec names, and the model they must fit."""

    field: str  # e.g. "student.init", "search.student[1].init", "teacher.init"
    model: ArchRef
    init: SafetensorsInit | UploadedInit


def inits_of(spec: JobSpec) -> list[InitRef]:
    """Every model the spec starts from given weights: students and a trained teacher."""
    found = []
    if spec.search is not None and spec.search.student is not None:
        students = [(f"search.student[{i}]", s) for i, s in enumerate(spec.search.student)]
    else:
        students = [("student", spec.student)]
    for where, s in students:
        if s is not None and s.init is not None:
            ref = ArchRef(f"{where}.arch", s.arch, s.arch_kwargs, f"{where}.arch_kwargs")
            found.append(InitRef(f"{where}.init", ref, s.init))
    t = spec.teacher
    if isinstance(t, TrainedTeacher) and t.init is not None:
        ref = ArchRef("teacher.arch", t.arch, t.arch_kwargs, "teacher.arch_kwargs")
        found.append(InitRef("teacher.init", ref, t.init))
    return found


def check_init(ref: InitRef, header: Header, shape: Sequence[int], classes: int) -> InitPlan:
    """The file's tensors (its header) fit the model built for this data, the classifier
    head excepted; raises SpecError naming those that do not. Call `check_model` first."""
    model = check_arch(ref.model.arch, ref.model.kwargs, shape, classes)  # meta
    return plan_init(model, header, f"{ref.field}: {ref.model.arch!r}")


def check_local_inits(spec: JobSpec, shape: Sequence[int], classes: int) -> dict[str, InitPlan]:
    """Each init given as a file on this machine, checked from its header; an upload id is
    for the service to check (it reads the header from its store)."""
    plans = {}
    for ref in inits_of(spec):
        if isinstance(ref.init, SafetensorsInit):
            try:
                header = file_header(Path(ref.init.path))
            except ModelLoadError as e:
                raise SpecError(f"{ref.field}.path: {e.message}") from None
            plans[ref.field] = check_init(ref, header, shape, classes)
    return plans


# --- all of it -----------------------------------------------------------------------------


def preflight(
    spec: JobSpec,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    limits: SpecLimits,
    teacher: ArchRef | None,
) -> dict[str, InitPlan]:
    """Raise SpecError (code `invalid_spec`, the message naming the field) for anything in
    `spec` that would fail before producing a result, given the data's shape. `teacher` is
    the teacher when its arch is known (`teacher_of(spec)`, or an upload's recorded arch).
    A search's every student is checked, and its number of candidates; so is each file of
    starting weights on this machine (returned: which tensors each loads, by field)."""
    students = students_of(spec)
    check_bounds([*students, teacher], limits)
    check_candidates(spec, limits)
    for ref in (*students, teacher):
        if ref is not None:
            check_model(ref, input_shape, num_classes, limits)
    if spec.distill.feature is not None:
        for student in students:
            check_feature(spec.distill.feature, student, teacher, input_shape, num_classes)
    return check_local_inits(spec, input_shape, num_classes)
