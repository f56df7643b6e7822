"""The API's public models: what every route returns, and what the client parses. Pydantic
only, in the thin package: the service (app/schemas) re-exports them, so the client and the
OpenAPI document cannot drift apart."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from distillery.states import JobStatus, StageStatus
from distillery_contract.webhooks import DEFAULT_EVENTS, DeliveryStatus, WebhookEvent

# --- jobs ------------------------------------------------------------------------------------


class ErrorPublic(BaseModel):
    code: str
    message: str


class StageAttemptPublic(BaseModel):
    attempt: int = Field(description="the job's attempt that ran it (1, 2, …)")
    started_at: datetime
    finished_at: datetime | None = Field(
        description="null while it runs; a lost worker's attempt ends at its last heartbeat"
    )
    seconds: float | None = None


class StagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str = Field(
        description="data (reading, decoding and normalising the dataset: its metrics hold "
        "samples, bytes and, for an image archive, decode_images_per_second), then teacher, "
        "baseline, distill, prune, quantize, export as the spec asks; a search: teacher, "
        "search, export"
    )
    status: StageStatus
    started_at: datetime | None = Field(None, description="its first attempt's start")
    finished_at: datetime | None = Field(None, description="its last attempt's end")
    seconds: float | None = Field(
        None, description="the time it ran, over all its attempts (the gaps between excluded)"
    )
    metrics: dict[str, Any] = Field(default_factory=dict)
    attempts: list[StageAttemptPublic] = Field(
        default_factory=list,
        description="each attempt at the stage: two or more when a worker was lost in it and "
        "the job resumed",
    )


class GatePublic(BaseModel):
    gate: str = Field(description="the expression, e.g. final.accuracy_drop<=0.02")
    name: str | None = Field(None, description="the spec's gates field it came from")
    value: float | None = Field(description="the measured value; null if it was not measured")
    passed: bool
    missed_by: float | None = Field(
        None, description="a failed gate: how far the value is past the limit, in its units"
    )


class BranchPublic(BaseModel):
    id: str
    branch: int = Field(description="the student it trains: index into search.student")
    status: JobStatus
    progress: float
    attempts: int
    error: ErrorPublic | None = None


class JobPublic(BaseModel):
    id: str
    name: str
    status: JobStatus
    stage: str | None
    progress: float = Field(ge=0.0, le=1.0)
    stages: list[StagePublic]
    metrics: dict[str, Any] = Field(description="the metrics contract, filled in as stages finish")
    gates: list[GatePublic] = Field(
        default_factory=list, description="the spec's gates, checked once the job succeeded"
    )
    gates_passed: bool | None = Field(
        None, description="all of the spec's gates passed; null until the job succeeded"
    )
    error: ErrorPublic | None
    spec: dict[str, Any]
    queue: str
    attempts: int
    parent_id: str | None = Field(None, description="a search's branch: the search")
    branch: int | None = Field(None, description="a search's branch: which one")
    branches: list[BranchPublic] = Field(
        default_factory=list, description="a search: its branches (one child job per student)"
    )
    candidates_total: int | None = Field(
        None, description="a search: how many candidates its axes make"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    artifacts_expired_at: datetime | None = Field(
        None,
        description="retention deleted the job's files then (410 `artifacts_expired` on its "
        "artifacts); the record and metrics remain",
    )


class SubmittedJob(JobPublic):
    """What `Client.submit` returns: the job, and whether the service replayed it (an earlier
    submit with the same Idempotency-Key made it; the API says so with `Idempotent-Replayed`)."""

    replayed: bool = False


class JobsPublic(BaseModel):
    data: list[JobPublic]
    has_more: bool
    next_after: str | None = Field(description="pass as `after` for the next page")


class ArtifactPublic(BaseModel):
    name: str
    format: str
    bytes: int
    sha256: str
    url: str
    final: bool = Field(
        False,
        description="the job's final model, in the file to deploy (also at "
        "/v1/jobs/{id}/artifacts/final); at most one per job",
    )


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]


class HistoryRowPublic(BaseModel):
    """One epoch of one training run. Columns in this order in the CSV too."""

    model_config = ConfigDict(from_attributes=True)

    stage: str = Field(description="teacher, baseline, distill or prune")
    run: str = Field(
        description="the training run inside the stage: teacher, baseline, distill, finetune1, …"
    )
    epoch: int = Field(description="1-based")
    step: int = Field(description="optimizer steps so far in this run")
    lr: float | None = Field(description="the learning rate at the end of the epoch")
    loss: float | None = Field(description="the epoch's mean of what was minimised")
    task_loss: float | None = Field(description="cross-entropy on the labels")
    kd_loss: float | None = Field(description="the distillation term; null without a teacher")
    feature_loss: float | None = Field(description="the feature term; null without one")
    val_accuracy: float | None = Field(
        description="accuracy on the validation split after the epoch; null without one"
    )
    seconds: float = Field(description="wall time since the run started")


class HistoryPublic(BaseModel):
    data: list[HistoryRowPublic]


class CandidatePublic(BaseModel):
    """One model a search job measured (GET /v1/jobs/{id}/candidates)."""

    model_config = ConfigDict(from_attributes=True)

    key: str = Field(description="s<student>-d<recipe>-p<pruning>-q<quantizer>")
    branch: int = Field(description="the branch (child job, one per student) that made it")
    axes: dict[str, Any] = Field(description="the value of each search axis for this candidate")
    metrics: dict[str, Any] = Field(
        description="accuracy, accuracy_ci [lo, hi], accuracy_drop, accuracy_drop_ci, params, "
        "macs, size_bytes, latency_ms, latency_b32_ms, size_ratio, speedup, …"
    )
    gates: list[GatePublic] | None = None
    gates_passed: bool | None = None
    on_front: bool = Field(description="on the Pareto front of the job's objectives")
    final: bool = Field(description="the candidate the job chose as its final model")
    artifacts: list[str] = Field(
        default_factory=list, description="names under /artifacts (front candidates' models)"
    )


class CandidatesPublic(BaseModel):
    data: list[CandidatePublic]


# --- uploads ---------------------------------------------------------------------------------


class DatasetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    kind: Literal["npz", "imagefolder"]
    bytes: int
    sha256: str
    num_samples: int
    num_classes: int
    input_shape: list[int]
    class_names: list[str]
    created_at: datetime


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    has_more: bool
    next_after: str | None = Field(description="pass as `after` for the next page")


class ModelPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    format: Literal["torchscript", "onnx", "safetensors"]
    arch: str | None
    arch_kwargs: dict[str, Any]
    bytes: int
    sha256: str
    input_shape: list[int] | None
    num_classes: int | None
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    has_more: bool
    next_after: str | None = Field(description="pass as `after` for the next page")


# --- webhooks --------------------------------------------------------------------------------

# The events and their defaults are the contract's (distillery_contract.webhooks); the names
# stay importable from here.
DEFAULT_WEBHOOK_EVENTS: list[WebhookEvent] = list(DEFAULT_EVENTS)


MAX_UPLOAD_PARTS = 10_000  # S3's limit, kept for local stores too


class UploadModelFields(BaseModel):
    """A teacher's fields, as POST /v1/models takes them in its form."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["torchscript", "onnx", "safetensors"] | None = None
    arch: str | None = Field(None, max_length=64)
    arch_kwargs: str | None = Field(None, max_length=10_000, description="a JSON object")
    input_shape: str | None = Field(None, max_length=100, description="C,H,W or D")
    num_classes: str | None = Field(None, max_length=20)


class UploadCreate(BaseModel):
    """POST /v1/uploads: a resumable upload of one dataset or teacher file, sent in parts."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["dataset", "model"]
    filename: str = Field(min_length=1, max_length=255)
    bytes: int = Field(gt=0, description="the file's size")
    sha256: str | None = Field(
        None, pattern="^[0-9a-fA-F]{64}$", description="checked when the upload completes"
    )
    part_bytes: int | None = Field(
        None, gt=0, description="every part but the last (default: 16 MiB, or more for big files)"
    )
    fields: UploadModelFields = Field(default_factory=UploadModelFields)


class UploadPartPublic(BaseModel):
    number: int
    bytes: int


class UploadPublic(BaseModel):
    """A resumable upload: which parts the server (or the bucket) holds, and where the
    others go: `PUT /v1/uploads/{id}/parts/{n}` on the API, or, on a bucket store, the
    presigned URL in `part_urls` (for up to 100 missing parts; GET again for more)."""

    id: str
    kind: Literal["dataset", "model"]
    filename: str
    bytes: int
    part_bytes: int
    parts_total: int
    sha256: str | None
    status: Literal["open", "completing", "completed"]
    parts: list[UploadPartPublic] = Field(description="the parts received, by number")
    part_urls: dict[int, str] | None = Field(
        None, description="bucket store: part number -> presigned PUT URL, no API key"
    )
    result_id: str | None = Field(None, description="the dataset or model, once completed")
    created_at: datetime
    expires_at: datetime


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, description="https URL that receives the deliveries")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS), min_length=1, max_length=4
    )
    description: str = Field("", max_length=200)


class WebhookPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    url: str
    events: list[str]
    description: str
    created_at: datetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(
        description="the signing secret (whsec_…), shown only in this response: keep it"
    )


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]


class WebhookSecretPublic(BaseModel):
    secret: str = Field(description="signs the deliveries of the webhooks jobs name (whsec_…)")


class DeliveryAttemptPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int = Field(description="1 for the first try")
    at: datetime
    status_code: int | None = Field(description="the receiver's HTTP status; null on no answer")
    error: str | None = Field(description="why it failed without an answer (timeout, refused, …)")
    response: str = Field(description="the start of the receiver's answer (at most 256 bytes)")
    seconds: float


class DeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str = Field(description="the webhook-id header: the same on every attempt")
    webhook_id: str | None = Field(description="the endpoint; null for a job's own webhook")
    job_id: str
    event: str
    url: str
    status: DeliveryStatus
    attempts: list[DeliveryAttemptPublic]
    next_attempt_at: datetime | None
    created_at: datetime


class DeliveriesPublic(BaseModel):
    data: list[DeliveryPublic]
    has_more: bool
    next_after: str | None = Field(description="pass as `after` for the next page")
