"""A stage's attempts: when a worker is lost mid-stage and the job resumes, the stage runs
again. Its record keeps every attempt (start, end, seconds) instead of only the last, so the
stage's start is its first start, its end the last one's, and its `seconds` the time it ran
(the gap while the job waited for a worker excluded). Pure functions over JobStage rows; the
lifecycle calls them inside its own transitions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs.states import StageStatus
from app.models import JobStage


def _iso(at: datetime) -> str:
    return at.isoformat()


def _seconds_since(start: str, at: datetime) -> float:
    return max((at - datetime.fromisoformat(start)).total_seconds(), 0.0)


def begin(row: JobStage, *, attempt: int, now: datetime) -> None:
    """The stage starts (again): an attempt left open by a lost worker ends at `now`."""
    attempts = close(row.attempts or [], at=now)
    row.attempts = [*attempts, {"attempt": attempt, "started_at": _iso(now), "finished_at": None,
                                "seconds": None}]  # fmt: skip
    row.started_at = row.started_at or now  # the first attempt's start stands
    row.finished_at, row.seconds = None, None


def end(row: JobStage, *, attempt: int, now: datetime, seconds: float | None) -> None:
    """The stage ended at `now`, its last attempt having run `seconds` (the worker's own
    measure; else the wall time since that attempt began). A stage with no attempt on record
    (a search's, begun by set_stage_row) gets one from its start."""
    attempts = list(row.attempts or [])
    if not attempts or attempts[-1]["finished_at"] is not None:
        start = _iso(row.started_at or now)
        attempts.append({"attempt": attempt, "started_at": start, "finished_at": None,
                         "seconds": None})  # fmt: skip
    last = attempts[-1]
    spent = seconds if seconds is not None else _seconds_since(last["started_at"], now)
    attempts[-1] = {**last, "finished_at": _iso(now), "seconds": spent}
    row.attempts = attempts
    row.started_at = row.started_at or datetime.fromisoformat(attempts[0]["started_at"])
    row.finished_at = now
    row.seconds = sum(a["seconds"] or 0.0 for a in attempts)


def close(attempts: list[dict[str, Any]], *, at: datetime) -> list[dict[str, Any]]:
    """`attempts` with an open last one ended at `at` (never before it began)."""
    if not attempts or attempts[-1]["finished_at"] is not None:
        return list(attempts)
    last = attempts[-1]
    spent = _seconds_since(last["started_at"], at)
    ended = max(at, datetime.fromisoformat(last["started_at"]))
    return [*attempts[:-1], {**last, "finished_at": _iso(ended), "seconds": spent}]


def last_sign_of_life(
    heartbeat_at: datetime | None, updated_at: datetime | None
) -> datetime | None:
    """When a job's worker was last heard of: its heartbeat, or a later write of its progress
    or stage (a stage can start and be cut short between two heartbeats)."""
    return max((t for t in (heartbeat_at, updated_at) if t is not None), default=None)


def interrupt(session: Session, *, job_id: str, at: datetime) -> None:
    """The job's worker is gone: each stage it was running stopped at `at` (its last sign
    of life), and waits for the next attempt."""
    rows = session.scalars(
        select(JobStage).where(JobStage.job_id == job_id, JobStage.status == StageStatus.RUNNING)
    )
    for row in rows:
        row.attempts = close(row.attempts or [], at=at)
