"""What the API says about jobs. The public models live in the thin client package
(distillery.schemas), so the client parses exactly what the routes return; the spec itself is
the pipeline's JobSpec."""

from __future__ import annotations

from distillery.schemas import (
    ArtifactPublic,
    ArtifactsPublic,
    BranchPublic,
    CandidatePublic,
    CandidatesPublic,
    ErrorPublic,
    GatePublic,
    HistoryPublic,
    HistoryRowPublic,
    JobPublic,
    JobsPublic,
    StagePublic,
)
from worker.pipeline.spec import JobSpec

JobCreate = JobSpec  # one model for `distillery run`, the API and the workers

__all__ = [
    "ArtifactPublic",
    "BranchPublic",
    "ArtifactsPublic",
    "CandidatePublic",
    "CandidatesPublic",
    "ErrorPublic",
    "GatePublic",
    "HistoryPublic",
    "HistoryRowPublic",
    "JobCreate",
    "JobPublic",
    "JobsPublic",
    "StagePublic",
]
