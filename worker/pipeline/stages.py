"""The stages of a job, as a registry like the others: a stage declares its name, when it
runs, what it costs (for progress), the models it measures and the files it leaves in the
output folder. The runner walks `STAGES.plan(spec)`; adding a stage is one decorated function:

    @STAGES.register("calibrate", after="distill", models=("calibrated",),
                     artifacts=lambda spec: {"calibration.json": "json"})
    def calibrate(state: JobState, ctx: StageContext, resumed: bool) -> dict[str, float]:
        ...  # read state.models / state.data, write into state.out, return the stage's metrics

A stage function gets the job's state, a context for this stage (device, progress, cancel,
checkpoint folder) and whether the stage already finished in an earlier attempt (then it
reloads what it made instead of making it again). Heavy modules are imported inside the
functions: the API imports this module to plan a job's stages at POST.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distillery_contract.states import StageStatus  # noqa: F401  (stages are named with it here too)
from worker.pipeline.registry import UnknownName
from worker.pipeline.spec import JobSpec, TrainedTeacher

if TYPE_CHECKING:
    from worker.pipeline.context import StageContext
    from worker.pipeline.state import JobState


StageFn = Callable[["JobState", "StageContext", bool], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    weight: Callable[[JobSpec], float]  # rough cost in epochs, for the job's progress
    enabled: Callable[[JobSpec], bool]
    models: tuple[str, ...]  # the models it measures (keys of the report's metrics)
    artifacts: Callable[[JobSpec], dict[str, str]]  # files it writes: name -> format


def _always(spec: JobSpec) -> bool:
    return True


def _one(spec: JobSpec) -> float:
    return 1.0


def _none(spec: JobSpec) -> dict[str, str]:
    return {}


class StageRegistry:
    """Stages in the order they run."""

    def __init__(self) -> None:
        self._stages: list[Stage] = []

    def register(
        self,
        name: str,
        *,
        after: str | None = None,
        weight: Callable[[JobSpec], float] = _one,
        enabled: Callable[[JobSpec], bool] = _always,
        models: tuple[str, ...] = (),
        artifacts: Callable[[JobSpec], dict[str, str]] = _none,
    ) -> Callable[[StageFn], StageFn]:
        """Add a stage at the end, or right after the stage named `after`."""

        def decorator(fn: StageFn) -> StageFn:
            if name in self.names():
                raise ValueError(f"stage {name!r} registered twice")
            at = len(self._stages) if after is None else self.names().index(after) + 1
            self._stages.insert(at, Stage(name, fn, weight, enabled, models, artifacts))
            return fn

        if after is not None and after not in self.names():
            raise UnknownName("stage", after, self.names())
        return decorator

    def unregister(self, name: str) -> None:
        self._stages.remove(self.get(name))

    def get(self, name: str) -> Stage:
        for stage in self._stages:
            if stage.name == name:
                return stage
        raise UnknownName("stage", name, self.names())

    def names(self) -> list[str]:
        return [s.name for s in self._stages]

    def plan(self, spec: JobSpec) -> list[Stage]:
        """The stages `spec` runs, in order."""
        return [s for s in self._stages if s.enabled(spec)]

    def artifacts(self, spec: JobSpec) -> dict[str, str]:
        """Every file the stages of `spec` leave in the output folder: name -> format."""
        return {k: v for s in self.plan(spec) for k, v in s.artifacts(spec).items()}


STAGES = StageRegistry()
# A search job's stages: the teacher once, the candidates (branches, on many workers in the
# service), then the choice and the export.
SEARCH_STAGES = ("teacher", "search", "export")


def stage_names(spec: JobSpec) -> list[str]:
    """The stages a job records: reading the data (the runner's `load_data`), then the
    registry's plan; or a search's three."""
    if spec.search is not None:
        return list(SEARCH_STAGES)
    return ["data", *(s.name for s in STAGES.plan(spec))]


# --- the built-in stages --------------------------------------------------------------------


def _teacher_weight(spec: JobSpec) -> float:
    return max(float(spec.teacher.epochs), 1.0) if isinstance(spec.teacher, TrainedTeacher) else 1.0


@STAGES.register("teacher", weight=_teacher_weight, models=("teacher",))
def teacher(state: JobState, ctx: StageContext, resumed: bool) -> dict[str, Any]:
    """Train the teacher, or load the uploaded one; measure it."""
    from worker.pipeline import teacher as teachers
    from worker.pipeline.evaluate import onnx_params

    spec = state.spec.teacher
    if isinstance(spec, TrainedTeacher) and resumed:
        model = state.load_model("teacher", spec.arch, spec.arch_kwargs)
        state.teacher = teachers.TeacherResult(model, model, None, {}, spec.arch, spec.arch_kwargs)
        return {}
    result = state.teacher = teachers.run(spec, state.data, ctx, state.spec.seed)
    if resumed:  # an upload: reloading it is cheap, its metrics are on record
        return result.metrics
    if isinstance(spec, TrainedTeacher):
        state.save_model("teacher", result.module, spec.arch, spec.arch_kwargs)
    if result.onnx_path is not None:
        state.measure_onnx("teacher", result.onnx_path, onnx_params(result.onnx_path))
    else:
        state.measure_module("teacher", result.module)
    return result.metrics


def _distill_epochs(spec: JobSpec) -> float:
    return max(float(spec.distill.epochs), 1.0)


@STAGES.register(
    "baseline",
    weight=_distill_epochs,
    enabled=lambda spec: spec.distill.baseline and spec.student is not None,
    models=("baseline",),
)
def baseline(state: JobState, ctx: StageContext, resumed: bool) -> dict[str, Any]:
    """The student trained on labels alone: what distillation has to beat."""
    from worker.pipeline.distill import train_student

    s = state.spec
    if resumed:
        state.models["baseline"] = state.load_student("baseline")
        return {}
    model, metrics = train_student(
        s.student, s.distill, state.data, ctx, s.seed, signal=None, tag="baseline"
    )
    state.models["baseline"] = model
    state.save_student("baseline", model)
    state.measure_module("baseline", model)
    return metrics


@STAGES.register(
    "distill",
    weight=_distill_epochs,
    enabled=lambda spec: spec.student is not None,
    models=("student",),
)
def distill(state: JobState, ctx: StageContext, resumed: bool) -> dict[str, Any]:
    """The student trained against the teacher (measured as `student`); then the better of
    it and the baseline on the validation split is kept and goes on."""
    from worker.pipeline import distill as distillation

    s = state.spec
    if resumed:
        state.kept = state.record_of("distill").get("metrics", {}).get("kept", "distilled")
        state.models["kept"] = state.load_student("kept")
        return {}
    assert state.teacher is not None
    model, metrics, state.signal = distillation.run(
        state.teacher, state.data, s.distill, s.student, ctx, s.seed, signal=state.signal
    )
    state.measure_module("student", model)
    selection = state.keep_better(model)
    if state.kept == "baseline":
        ctx.log(
            "the student trained without a teacher scored higher on the validation split "
            f"({selection['val_accuracy_baseline']:.4f} vs "
            f"{selection['val_accuracy_distilled']:.4f}): keeping it"
        )
    state.save_student("kept", state.models["kept"])
    return {**metrics, **selection}


@STAGES.register(
    "prune",
    weight=lambda spec: spec.prune.finetune_epochs + 1.0 if spec.prune else 0.0,
    enabled=lambda spec: spec.prune is not None,
    models=("pruned",),
)
def prune(state: JobState, ctx: StageContext, resumed: bool) -> dict[str, Any]:
    """Prune the kept student and fine-tune it against the teacher; in a compress-only job,
    prune the teacher and fine-tune it against its own original outputs (self-distillation)."""
    from worker.pipeline import prune as pruning

    s = state.spec
    if resumed:
        state.models["pruned"] = state.load_student("pruned")
        return {}
    assert s.prune is not None
    model, metrics = pruning.run(
        state.start_model(), state.data, s.prune, s.distill, state.teacher_signal(), ctx, s.seed
    )
    metrics["self_distilled"] = float(state.compress_only)
    state.models["pruned"] = model
    state.save_student("pruned", model)
    state.measure_module("pruned", model)
    return metrics


def _quantized_file(spec: JobSpec) -> dict[str, str]:
    from worker.pipeline.quantize import QUANTIZERS

    if spec.quantize is None:
        return {}
    q = QUANTIZERS.get(spec.quantize.method)
    files = {q.filename: q.format}
    if spec.quantize.method == "int8_static":  # written when nodes were scored
        files.update({"sensitivity.json": "json", "sensitivity.csv": "csv"})
    return files


def _quantize_weight(spec: JobSpec) -> float:
    q = spec.quantize
    return 2.0 + (q.qat_epochs if q is not None and q.method == "qat" else 0.0)


@STAGES.register(
    "quantize",
    weight=_quantize_weight,
    enabled=lambda spec: spec.quantize is not None,
    models=("quantized",),
    artifacts=_quantized_file,
)
def quantize(state: JobState, ctx: StageContext, resumed: bool) -> dict[str, Any]:
    """Quantize the last float model through ONNX Runtime, or by quantization-aware
    distillation; measure the result."""
    from worker.pipeline import quantize as quantization
    from worker.pipeline.archs import count_params
    from worker.pipeline.evaluate import onnx_params
    from worker.pipeline.export import export_onnx

    s = state.spec
    assert s.quantize is not None
    key, model = state.final_float()
    quantizer = quantization.QUANTIZERS.get(s.quantize.method)
    dst = state.out / quantizer.filename
    if quantizer.trains:
        return _quantize_aware(state, ctx, model, dst, resumed)
    if key == "teacher":  # compress-only without pruning: the teacher as it was measured
        src = state.teacher_onnx()
    elif not resumed or not dst.exists():
        assert model is not None
        src = export_onnx(model, state.data.x_test, state.work / f"{key}.onnx")
    controlled: dict[str, Any] = {}
    if not resumed or not dst.exists():
        calib = state.data.calibration(s.quantize.calibration_samples, s.seed)
        if by_node(s):
            controlled = _int8_by_node(state, ctx, src, dst, calib)
        else:
            quantization.run(src, dst, calib, s.quantize)
    params = count_params(model) if model is not None else onnx_params(state.teacher_onnx())
    m = state.measure_onnx("quantized", dst, params)
    if s.quantize.method == "int8_static":  # the model card says which width it got
        m["weight_bits"] = quantization.weight_bits(s.quantize)[0]
    if controlled:
        reason = _qat_fallback_reason(s, controlled, model)
        if reason is not None:
            ctx.log(f"quantize: {reason}; quantization-aware distillation instead")
            aware = _quantize_aware(state, ctx, model, dst, resumed=False)
            return {**controlled, **aware, "qat_fallback": reason, **_test_drop(state, key)}
        controlled.update(_test_drop(state, key))
    return {"method_" + s.quantize.method: 1.0, "accuracy": m["accuracy"], **controlled}


def _qat_fallback_reason(spec: JobSpec, controlled: dict[str, Any], model: Any) -> str | None:
    """Why accuracy-controlled PTQ hands over to qat (None: it does not): it left more of the
    weights in float than `quantize.qat_fallback_share`, or missed its budget anyway."""
    q = spec.quantize
    assert q is not None
    control = controlled.get("accuracy_control")
    # Nodes the user keeps in float are a choice, not a failure of PTQ.
    if q.qat_fallback_share is None or q.keep_float or model is None or control is None:
        return None
    share = q.qat_fallback_share
    if not control.get("met", True):
        return "accuracy control missed its budget"
    if controlled.get("float_share", 0.0) > share:
        return (
            f"accuracy control left {controlled['float_share']:.0%} of the weights in float "
            f"(more than quantize.qat_fallback_share {share:.0%})"
        )
    return None


def accuracy_budget(spec: JobSpec) -> float | None:
    """The validation loss int8_static may cost against its float model: the spec's
    quantize.max_accuracy_drop, else the gate's max_accuracy_drop."""
    q = spec.quantize
    if q is None or q.method != "int8_static":
        return None
    return q.max_accuracy_drop if q.max_accuracy_drop is not None else spec.gates.max_accuracy_drop


def by_node(spec: JobSpec) -> bool:
    """Whether int8_static goes node by node (names to keep float, a budget, sensitivity)."""
    q = spec.quantize
    return (
        q is not None
        and q.method == "int8_static"
        and bool(q.keep_float or q.sensitivity or accuracy_budget(spec) is not None)
    )


def _int8_by_node(state: JobState, ctx: StageContext, src, dst, calib) -> dict[str, Any]:
    from worker.pipeline import sensitivity

    s = state.spec
    assert s.quantize is not None
    budget = accuracy_budget(s)
    if budget is not None and state.data.val is None:
        ctx.log("no validation split: quantizing without accuracy control")
    return sensitivity.run(
        src,
        dst,
        calib,
        s.quantize,
        budget=budget,
        val=state.data.val,
        seed=s.seed,
        work=state.work / "sensitivity",
        out=state.out,
        ctx=ctx,
    )


def _test_drop(state: JobState, float_key: str) -> dict[str, Any]:
    """The test-split accuracy int8 lost against its float model, with its paired interval."""
    import numpy as np

    from worker.pipeline.stats import paired_drop_ci

    parent = {"kept": "baseline" if state.kept == "baseline" else "student"}.get(
        float_key, float_key
    )
    before = np.load(state.correct_path(parent))
    after = np.load(state.correct_path("quantized"))
    return {
        "test_accuracy_drop": float(before.mean() - after.mean()),
        "test_accuracy_drop_ci": list(paired_drop_ci(before, after, seed=state.spec.seed)),
    }


def _quantize_aware(
    state: JobState, ctx: StageContext, model: Any, dst: Any, resumed: bool
) -> dict[str, Any]:
    """`qat`: fine-tune the last float model against the teacher with fake quantization,
    export it as int8 QDQ ONNX, measure it like every other model."""
    from worker.pipeline import qat
    from worker.pipeline.archs import count_params
    from worker.pipeline.quantize import weight_bits

    s = state.spec
    assert s.quantize is not None and model is not None  # the spec refuses qat without layers
    metrics: dict[str, Any] = {}
    if not resumed or not dst.exists():
        signal = state.teacher_signal()
        metrics = qat.run(model, state.data, s.quantize, s.distill, signal, ctx, s.seed, dst)
    m = state.measure_onnx("quantized", dst, count_params(model))
    m["weight_bits"] = weight_bits(s.quantize)[0]
    return {**metrics, "method_qat": 1.0, "accuracy": m["accuracy"]}


def _exported_files(spec: JobSpec) -> dict[str, str]:
    from worker.pipeline.export import EXPORTERS

    return {EXPORTERS.get(f).filename: EXPORTERS.get(f).format for f in spec.export}


@STAGES.register("export", artifacts=_exported_files)
def export(state: JobState, ctx: StageContext, resumed: bool) -> dict[str, Any]:
    """The chosen model's float weights in each format the spec asks for (the quantize
    stage already wrote the quantized file)."""
    import shutil

    from worker.pipeline.export import EXPORTERS
    from worker.pipeline.report import choose_final

    choice, _ = choose_final(state)
    model = state.float_of(choice.final)
    arch, kwargs = state.subject_arch()
    meta = {"arch": arch, "arch_kwargs": kwargs, "spec": state.public_spec}
    for fmt in state.spec.export:
        exporter = EXPORTERS.get(fmt)
        if model is None:  # an ONNX teacher compressed by itself: its own file (the spec
            # allows no other format then)
            shutil.copyfile(state.teacher_onnx(), state.out / exporter.filename)
            continue
        exporter.run(model, state.data.x_test[:1], state.out / exporter.filename, meta)
    return {}
