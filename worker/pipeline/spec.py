"""The job spec: one Pydantic model shared by `distillery run`, the API and the workers.

Defaults give a good result on the built-in digits data; every name resolves through a
registry and an unknown one fails validation with the list of known names.
"""

from __future__ import annotations

import inspect
import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from distillery_contract.webhooks import DEFAULT_EVENTS, WebhookEvent


class _Spec(BaseModel):
    # A spec is stored as JSON: NaN and infinity are not JSON (PostgreSQL refuses them), and
    # no bound or gate means anything with them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # NUL cannot be stored in a PostgreSQL text column, and names nothing real.
        if isinstance(v, str) and "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v


def _known(registry, name: str) -> str:
    """`name` if `registry` knows it; else a ValueError listing the names it knows. Each
    validator imports its registry inside itself: those modules import this one for their
    spec types."""
    from worker.pipeline.registry import UnknownName

    try:
        registry.get(name)
    except UnknownName as e:
        raise ValueError(str(e)) from None
    return name


def check_arch_kwargs(arch: str, kwargs: dict[str, Any]) -> None:
    from worker.pipeline.archs import ARCHS

    builder = ARCHS.get(arch)
    params = inspect.signature(builder).parameters
    reserved = {"in_shape", "num_classes"}
    accepted = [p for p in params if p not in reserved]
    for key in kwargs:
        if key not in accepted:
            raise ValueError(
                f"arch {arch!r} takes no argument {key!r}; it takes: {', '.join(accepted) or 'none'}"
            )
    # Walked without recursion: a value nested past Python's recursion limit must fail here
    # as a ValueError, not crash the caller.
    pending: list[Any] = list(kwargs.items())
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.items())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"arch_kwargs hold {item}; values must be finite numbers")
        elif isinstance(item, str) and "\x00" in item:
            raise ValueError("arch_kwargs must not contain NUL characters")


# --- dataset -------------------------------------------------------------------------------


class DatasetCommon(_Spec):
    test_fraction: float = Field(0.2, gt=0.0, lt=0.9, description="held-out share for evaluation")
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=0.5,
        description="share of the training split held out to choose between models",
    )
    max_samples: int | None = Field(None, ge=20, description="subsample (seeded) to this many")


class BuiltinDataset(DatasetCommon):
    source: Literal["builtin"] = "builtin"
    name: str = "digits"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from worker.pipeline.data import BUILTIN_DATASETS

        return _known(BUILTIN_DATASETS, v)


class TorchvisionDataset(DatasetCommon):
    source: Literal["torchvision"]
    name: str
    root: str = Field("./data", description="folder holding (or receiving) the files")
    download: bool = Field(False, description="download when missing (needs network)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from worker.pipeline.data import TORCHVISION_DATASETS

        return _known(TORCHVISION_DATASETS, v)


class NpzDataset(DatasetCommon):
    source: Literal["npz"]
    path: str = Field(description=".npz with x (N,C,H,W or N,D) and y (N,) integer labels")


class ImageFolderDataset(DatasetCommon):
    source: Literal["imagefolder"]
    path: str = Field(description=".zip or .tar.gz of class_name/image files")
    image_size: int = Field(32, ge=8, le=512)
    grayscale: bool = False


class UploadedDataset(DatasetCommon):
    """A dataset uploaded to the service (POST /v1/datasets); the worker resolves the id."""

    source: Literal["upload"]
    id: str = Field(min_length=1, max_length=64)
    image_size: int = Field(32, ge=8, le=512, description="for image-folder uploads")
    grayscale: bool = False


def _source_or(default: str, known: str):
    """Discriminate on `source`, defaulting when it is left out (a teacher with just an arch
    is trained; a dataset with just a name is built in)."""

    def get(value: Any) -> str:
        if isinstance(value, dict):
            return value.get("source", default)
        return getattr(value, "source", default)

    return Discriminator(
        get,
        custom_error_type="invalid_source",
        custom_error_message=f"unknown source; known: {known}",
    )


DatasetSpec = Annotated[
    Annotated[BuiltinDataset, Tag("builtin")]
    | Annotated[TorchvisionDataset, Tag("torchvision")]
    | Annotated[NpzDataset, Tag("npz")]
    | Annotated[ImageFolderDataset, Tag("imagefolder")]
    | Annotated[UploadedDataset, Tag("upload")],
    _source_or("builtin", "builtin, torchvision, npz, imagefolder, upload"),
]


# --- models --------------------------------------------------------------------------------


class _ArchRef(_Spec):
    arch: str
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        from worker.pipeline.archs import ARCHS

        return _known(ARCHS, v)

    @model_validator(mode="after")
    def _kwargs(self) -> _ArchRef:
        check_arch_kwargs(self.arch, self.arch_kwargs)
        return self


class OptimSpec(_Spec):
    epochs: int = Field(30, ge=0, le=1000)
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=65536)


# --- starting weights ----------------------------------------------------------------------


class SafetensorsInit(_Spec):
    """Start from weights in a safetensors file on this machine (`distillery run`)."""

    source: Literal["safetensors"]
    path: str


class UploadedInit(_Spec):
    """Start from safetensors weights uploaded to the service (POST /v1/models with the same
    arch); the worker resolves the id."""

    source: Literal["upload"]
    id: str = Field(min_length=1, max_length=64)


InitSpec = Annotated[
    Annotated[SafetensorsInit, Tag("safetensors")] | Annotated[UploadedInit, Tag("upload")],
    Discriminator(
        lambda v: v.get("source") if isinstance(v, dict) else getattr(v, "source", None),
        custom_error_type="invalid_source",
        custom_error_message="unknown source; known: upload, safetensors",
    ),
]
INIT_DESCRIPTION = (
    "start from these weights instead of random ones: safetensors for the same arch. Every "
    "tensor must fit the model except the classifier head, which is replaced when the class "
    "count differs (the report says so)"
)


class TrainedTeacher(_ArchRef, OptimSpec):
    source: Literal["train"] = "train"
    arch: str = "cnn_large"
    init: InitSpec | None = Field(None, description=INIT_DESCRIPTION)


class TorchScriptTeacher(_Spec):
    source: Literal["torchscript"]
    path: str


class OnnxTeacher(_Spec):
    source: Literal["onnx"]
    path: str


class SafetensorsTeacher(_ArchRef):
    source: Literal["safetensors"]
    path: str


class UploadedTeacher(_Spec):
    """A teacher uploaded to the service (POST /v1/models); the worker resolves the id."""

    source: Literal["upload"]
    id: str = Field(min_length=1, max_length=64)


TeacherSpec = Annotated[
    Annotated[TrainedTeacher, Tag("train")]
    | Annotated[TorchScriptTeacher, Tag("torchscript")]
    | Annotated[OnnxTeacher, Tag("onnx")]
    | Annotated[SafetensorsTeacher, Tag("safetensors")]
    | Annotated[UploadedTeacher, Tag("upload")],
    _source_or("train", "train, torchscript, onnx, safetensors, upload"),
]


class StudentSpec(_ArchRef):
    arch: str = "cnn_small"
    init: InitSpec | None = Field(None, description=INIT_DESCRIPTION)


# --- stages --------------------------------------------------------------------------------


class FeatureLossSpec(_Spec):
    loss: str = Field("hint", description="feature loss: hint (FitNets) or at (attention transfer)")
    teacher_layer: str = Field(description="module name in the teacher, e.g. 'features.6'")
    student_layer: str = Field(description="module name in the student, e.g. 'features.3'")
    weight: float = Field(1.0, ge=0.0)

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        from worker.pipeline.losses import FEATURE_LOSSES

        return _known(FEATURE_LOSSES, v)


# Bounds shared by a plain spec's field and a search's axis over it.
Temperature = Annotated[float, Field(gt=0.0, le=100.0)]
Alpha = Annotated[float, Field(ge=0.0, le=1.0)]


def _known_pruner(v: str) -> str:
    from worker.pipeline.prune import PRUNERS

    return _known(PRUNERS, v)


def _known_quantizer(v: str) -> str:
    from worker.pipeline.quantize import QUANTIZERS

    return _known(QUANTIZERS, v)


def _known_calibration(v: str) -> str:
    from worker.pipeline.quantize import CALIBRATIONS

    return _known(CALIBRATIONS, v)


PrunerName = Annotated[str, AfterValidator(_known_pruner)]
QuantizerName = Annotated[str, AfterValidator(_known_quantizer)]
CalibrationName = Annotated[str, AfterValidator(_known_calibration)]


class DistillSpec(OptimSpec):
    loss: str = "kd"
    temperature: Temperature = 4.0
    alpha: Alpha = 0.9
    feature: FeatureLossSpec | None = None
    augment: bool = Field(
        False,
        description="random shifts/flips on image data: per batch, torchvision.transforms.v2 "
        "RandomCrop (zero-padded by 1/8 of the side) and RandomHorizontalFlip, drawn from the "
        "job's seed (same seed, same batches; resumes continue the stream); feature rows are "
        "not augmented",
    )
    cache_teacher_logits: bool = Field(
        True, description="compute teacher logits once (only when inputs are not augmented)"
    )
    baseline: bool = Field(True, description="also train the student without a teacher")
    keep: Literal["better", "distilled"] = Field(
        "better",
        description="with a baseline: keep whichever student scores higher on the validation split "
        "(on small students plain KD can lose to training alone); 'distilled' always keeps the KD one",
    )
    amp: bool = Field(True, description="mixed precision on CUDA")

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        from worker.pipeline.losses import KD_LOSSES

        return _known(KD_LOSSES, v)


class PruneSpec(_Spec):
    method: PrunerName = "channel_l2"
    amount: float = Field(0.5, gt=0.0, lt=1.0, description="share of channels/weights removed")
    steps: int = Field(1, ge=1, le=20, description="iterative pruning steps")
    finetune_epochs: int = Field(10, ge=0, le=1000, description="KD fine-tune epochs after pruning")
    lr: float = Field(
        3e-3, gt=0.0, le=10.0
    )  # measured: 1e-3 left the pruned digits model 0.7 pt lower


class SensitivitySpec(_Spec):
    """How much of the model and of the validation split per-node sensitivity looks at."""

    max_nodes: int = Field(
        24,
        ge=1,
        le=256,
        description="nodes scored at most: weighted ones (Conv, Gemm, MatMul) first, then "
        "the rest, in graph order; sensitivity.json names those left out",
    )
    samples: int = Field(
        1000,
        ge=10,
        le=100_000,
        description="validation samples scored (a seeded sample when the split is larger)",
    )
    max_seconds: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="stop scoring nodes after this long (those not reached are named)",
    )


KEEP_FLOAT_LIMIT = 256


class QuantizeSpec(_Spec):
    method: QuantizerName = Field(
        "int8_static",
        description="int8_static (calibrated PTQ), int8_dynamic, fp16, or qat: quantization-aware "
        "distillation (the float model fine-tuned against the teacher with fake quantization "
        "in the graph, then exported as int8 QDQ ONNX)",
    )
    calibration_samples: int = Field(512, ge=1, le=100_000)
    calibration: CalibrationName = Field(
        "minmax",
        description="int8_static activation ranges from the calibration samples: minmax, "
        "entropy (KL divergence of histograms) or percentile (`calibration_percentile`)",
    )
    calibration_percentile: float = Field(
        99.999, ge=90.0, le=100.0, description="the percentile calibration's cut, in percent"
    )
    qat_epochs: int = Field(
        5, ge=1, le=1000, description="qat: fine-tune epochs with fake quantization"
    )
    qat_lr: float = Field(
        3e-3,
        gt=0.0,
        le=10.0,
        description="qat: peak learning rate of the fine-tune (the prune fine-tune's default; "
        "docs/BENCHMARKS.md compares others)",
    )
    per_channel: bool = True
    weight_bits: Literal[7, 8] | None = Field(
        None,
        description="int8_static and qat weight width for the deployment CPU: 8 where it has VNNI "
        "(avx512_vnni, avx_vnni, amx_int8), 7 where it has not (8-bit weights can saturate "
        "its int16 sums); null: this worker's CPU decides. Recorded in the model card",
    )
    keep_float: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list,
        max_length=KEEP_FLOAT_LIMIT,
        description="int8_static: ONNX nodes left in float, by name as sensitivity.json lists "
        "them; an unknown name fails the job (invalid_spec) with the known names",
    )
    max_accuracy_drop: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="int8_static: accuracy the quantized model may lose against the float "
        "model it comes from, on the validation split; when missed, the most sensitive nodes "
        "go back to float until it holds. null: gates.max_accuracy_drop if set, else no control",
    )
    sensitivity: SensitivitySpec | None = Field(
        None,
        description="int8_static: score every node (sensitivity.json, .csv); true for the "
        "defaults. Accuracy control scores them anyway when it has to",
    )
    qat_fallback_share: float | None = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="int8_static with accuracy control: when it leaves more than this share "
        "of the weights in float, or still misses its budget, the stage quantizes by qat "
        "(quantization-aware distillation, qat_epochs at qat_lr) instead; null: never. Needs "
        "a model the job trains or prunes (not an uploaded ONNX/TorchScript teacher as it is)",
    )

    @field_validator("sensitivity", mode="before")
    @classmethod
    def _sensitivity_flag(cls, v: Any) -> Any:
        if v is True:
            return {}
        return None if v is False else v

    @model_validator(mode="after")
    def _int8_static_only(self) -> QuantizeSpec:
        asked = [
            name
            for name, value in (
                ("keep_float", self.keep_float),
                ("max_accuracy_drop", self.max_accuracy_drop),
                ("sensitivity", self.sensitivity),
            )
            if value not in (None, [])
        ]
        if asked and self.method != "int8_static":
            raise ValueError(
                f"{', '.join(asked)}: only for method int8_static (it quantizes node by node "
                f"from a calibration); method is {self.method!r}"
            )
        return self


class EvaluateSpec(_Spec):
    latency_runs: int = Field(200, ge=5, le=100_000)
    latency_warmup: int = Field(20, ge=0, le=10_000)
    latency_b32_runs: int = Field(
        30, ge=0, le=100_000, description="timed runs at batch 32 (0: not measured)"
    )
    threads: int = Field(1, ge=1, le=256, description="ONNX Runtime intra-op threads")
    compare_rounds: int = Field(
        20,
        ge=0,
        le=1000,
        description="interleaved rounds when two models' latencies are compared (each "
        "compression against its parent and the teacher) for a 95% interval on the speedup; "
        "0: no comparison (then min_speedup fails and slowness excludes nothing)",
    )


class GatesSpec(_Spec):
    max_accuracy_drop: float | None = Field(None, description="teacher.accuracy - final.accuracy")
    min_size_ratio: float | None = Field(None, description="teacher.size_bytes / final.size_bytes")
    min_speedup: float | None = Field(
        None,
        description="passes when the lower end of the 95% interval on teacher latency / final "
        "latency at batch 1 (interleaved runs on the same host) is at least this",
    )
    min_accuracy: float | None = None
    max_slowdown: float | None = Field(
        None,
        ge=1.0,
        description="how many times slower than the model it was made from a compression may "
        "be and still be chosen (default 1: never proven slower, whatever the objective)",
    )

    @model_validator(mode="before")
    @classmethod
    def _known_gates(cls, data: Any) -> Any:
        """A typo in a gate's name is refused naming the gates there are (a gate silently
        dropped would pass by omission)."""
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown gate {', '.join(map(repr, unknown))}; "
                    f"known: {', '.join(cls.model_fields)}"
                )
        return data


ExportFormat = Literal["onnx", "torchscript", "safetensors"]


class WebhookSpec(_Spec):
    """Service only (the pipeline ignores it): where to tell about this job. Deliveries are
    signed per Standard Webhooks with the tenant's secret (GET /v1/webhooks/default/secret)."""

    url: str = Field(max_length=2000, description="https URL on a public address")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        max_length=4,
    )


# What "best" means when choosing the final model: the smallest file, the fastest at batch 1
# or 32 (ONNX Runtime, CPU), or the most accurate; always among the models passing the gates.
Objective = Literal["size", "latency", "latency_b32", "accuracy"]
AXIS_LIMIT = 32  # values on one axis; the product of all axes is capped by SpecLimits


class SearchSpec(_Spec):
    """Axes to try: every combination of their values is a candidate. An axis left out keeps
    the plain spec's value. Students are distilled once per (temperature, alpha); prune
    amounts branch from each (0: not pruned); each model is quantized by each method (null:
    kept as float), int8_static once per calibration method."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, populate_by_name=True, serialize_by_alias=True
    )

    # null in the list: the teacher itself, compressed without a student (as `"student": null`)
    student: list[StudentSpec | None] | None = Field(None, min_length=1, max_length=AXIS_LIMIT)
    distill_temperature: list[Temperature] | None = Field(
        None, alias="distill.temperature", min_length=1, max_length=AXIS_LIMIT
    )
    distill_alpha: list[Alpha] | None = Field(
        None, alias="distill.alpha", min_length=1, max_length=AXIS_LIMIT
    )
    prune_amount: list[Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        None, alias="prune.amount", min_length=1, max_length=AXIS_LIMIT
    )
    prune_method: list[PrunerName] | None = Field(
        None, alias="prune.method", min_length=1, max_length=AXIS_LIMIT
    )
    quantize_method: list[QuantizerName | None] | None = Field(
        None, alias="quantize.method", min_length=1, max_length=AXIS_LIMIT
    )
    quantize_calibration: list[CalibrationName] | None = Field(
        None,
        alias="quantize.calibration",
        min_length=1,
        max_length=AXIS_LIMIT,
        description="int8_static calibration methods (other quantizers do not calibrate)",
    )
    objective: Objective | None = Field(None, description="overrides the spec's objective")


class JobSpec(_Spec):
    """A whole compression job. `prune` and `quantize` are optional stages (null skips them)."""

    name: str = Field("job", max_length=200)
    dataset: DatasetSpec = Field(default_factory=BuiltinDataset)
    teacher: TeacherSpec = Field(default_factory=TrainedTeacher)
    student: StudentSpec | None = Field(
        default_factory=StudentSpec,
        description="null: a compress-only job; the teacher itself is pruned (fine-tuned "
        "against its own original outputs) and quantized, and no student is trained",
    )
    distill: DistillSpec = Field(default_factory=DistillSpec)
    prune: PruneSpec | None = Field(default_factory=PruneSpec)
    quantize: QuantizeSpec | None = Field(default_factory=QuantizeSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    export: list[ExportFormat] = Field(
        default_factory=lambda: ["onnx", "torchscript", "safetensors"]
    )
    gates: GatesSpec = Field(default_factory=GatesSpec)
    objective: Objective = Field(
        "size", description="how the final model is chosen among those passing the gates"
    )
    search: SearchSpec | None = Field(
        None, description="try every combination of these axes and keep the best (a search job)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    queue: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="worker queue (service only), e.g. gpu"
    )
    webhook: WebhookSpec | None = Field(None, description="service only: told when the job ends")

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.distill.feature is not None and isinstance(self.teacher, OnnxTeacher):
            raise ValueError(
                "distill.feature: feature losses need the teacher's inner layers, "
                "which an ONNX teacher does not expose; use a TorchScript or safetensors teacher"
            )
        if self.compresses_teacher:
            self._check_compress_only()
        self._check_accuracy_control()
        return self

    def _check_accuracy_control(self) -> None:
        """Sensitivity and an accuracy budget are judged on the validation split, and in a
        plain job (a search quantizes each candidate whole)."""
        q = self.quantize
        if q is None or (q.max_accuracy_drop is None and q.sensitivity is None):
            return
        field = (
            "quantize.max_accuracy_drop"
            if q.max_accuracy_drop is not None
            else "quantize.sensitivity"
        )
        if self.search is not None:
            raise ValueError(
                f"{field}: not available in a search (each candidate is quantized whole)"
            )
        if self.dataset.val_fraction == 0:
            raise ValueError(
                f"{field}: needs a validation split to judge nodes on; set dataset.val_fraction > 0"
            )

    @property
    def compresses_teacher(self) -> bool:
        """A compress-only job, or a search with the teacher itself on its students axis."""
        if self.search is not None and self.search.student is not None:
            return any(s is None for s in self.search.student)
        return self.student is None

    def _check_compress_only(self) -> None:
        """What a job compressing the teacher itself cannot do, said before anything runs."""
        if self.search is None and self.prune is None and self.quantize is None:
            raise ValueError(
                "student: null compresses the teacher itself; ask for prune, quantize or both"
            )
        if self.distill.feature is not None:
            raise ValueError(
                "distill.feature: a compress-only job has no student to match the teacher's layers"
            )
        if isinstance(self.teacher, OnnxTeacher | TorchScriptTeacher):
            kind = "an ONNX" if isinstance(self.teacher, OnnxTeacher) else "a TorchScript"
            check_opaque_teacher(self, kind, "teacher.source")

    @property
    def goal(self) -> str:
        """The objective in force: the search's own, else the spec's."""
        if self.search is not None and self.search.objective is not None:
            return self.search.objective
        return self.objective


def check_opaque_teacher(spec: JobSpec, kind: str, field: str) -> None:
    """A compress-only job over a teacher without an arch (ONNX, TorchScript): it can be
    quantized (not by qat), not pruned (pruning and qat need the layers), nor searched, nor
    exported as weights."""
    if spec.search is not None:
        raise ValueError(
            f"{field}: a search that compresses the teacher itself needs its layers; {kind} "
            "teacher has none (use a teacher trained by the job, or safetensors + arch)"
        )
    if spec.prune is not None:
        raise ValueError(
            f"prune: {kind} teacher can be quantized but not pruned (pruning needs the "
            "model's layers: use a teacher trained by the job, or safetensors + arch); "
            'set "prune": null'
        )
    if spec.quantize is not None and spec.quantize.method == "qat":
        raise ValueError(
            f"quantize.method: qat fine-tunes the model's layers, which {kind} teacher "
            "compressed without a student does not expose; use int8_static, or a teacher "
            "trained by the job, or safetensors + arch"
        )
    if any(f != "onnx" for f in spec.export):
        raise ValueError(
            f'export: {kind} teacher compressed without a student exports only "onnx" '
            '(its float model) besides the quantized file; set "export": ["onnx"] or []'
        )


def format_validation_error(exc: Exception) -> str:
    """One line per problem, each naming the field path: what a CLI or API error shows."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(f"{field_path(err['loc'])}: {err['msg']}" for err in exc.errors())


def field_path(loc: tuple) -> str:
    """A validation error's location as users write it: `search.distill.temperature[2]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "spec"


def warm_registries() -> None:
    """Import every registry the validators above look names up in: the API calls this at
    start, so that no request pays for the imports (they would block its event loop)."""
    from worker.pipeline import archs, data, losses, prune, quantize  # noqa: F401
