"""What the API says about jobs. The spec itself is the pipeline's JobSpec."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.jobs.states import JobStatus, StageStatus
from worker.pipeline.spec import JobSpec

JobCreate = JobSpec  # one model for `distillery run`, the API and the workers


class ErrorPublic(BaseModel):
    code: str
    message: str


class StagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    status: StageStatus
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seconds: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class GatePublic(BaseModel):
    gate: str = Field(description="the expression, e.g. final.accuracy_drop<=0.02")
    name: str | None = Field(None, description="the spec's gates field it came from")
    value: float | None = Field(description="the measured value; null if it was not measured")
    passed: bool


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
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


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
