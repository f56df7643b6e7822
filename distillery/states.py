"""The statuses a client reads: a job's and a stage's. Pure Python, in the thin package, so
the client and the CLI need nothing else; the service's transitions (app/jobs/states.py) and
the pipeline's stage registry (worker/pipeline/stages.py) import them from here."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TERMINAL", "JobStatus", "StageStatus"]


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"  # a cancel was asked for; the worker stops at the next batch
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StageStatus(StrEnum):
    PENDING = "pending"  # planned, not started
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
