"""The stages of a job, and the statuses a stage moves through."""

from __future__ import annotations

from enum import StrEnum


class StageStatus(StrEnum):
    PENDING = "pending"  # planned, not started
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
