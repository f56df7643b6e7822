"""A job's and a stage's statuses, what the API stores, the worker moves and the client reads.
The allowed moves between job statuses are the service's (app/jobs/states.py)."""

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
