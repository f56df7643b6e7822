"""A job's training history: every epoch of every training run, as the worker records it
(GET /v1/jobs/{id}/history reads it). Rows follow the pipeline's HISTORY_COLUMNS."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.jobs.events import add_event
from app.jobs.ownership import owned
from app.models import Job, JobHistory
from worker.pipeline.history import HISTORY_COLUMNS


def record_history(
    session: Session, *, job_id: str, worker_id: str, rows: list[dict[str, Any]]
) -> bool:
    """Store epochs of training runs (HISTORY_COLUMNS rows) and announce each as a `history`
    event. A row replaces its run's rows from its epoch on, as the pipeline's own log does: a
    resumed job writes the epochs it runs again once more. False when the job is not ours."""
    if session.scalar(select(Job.id).where(owned(job_id, worker_id))) is None:
        return False
    for row in rows:
        session.execute(
            delete(JobHistory).where(
                JobHistory.job_id == job_id,
                JobHistory.run == row["run"],
                JobHistory.epoch >= row["epoch"],
            )
        )
        session.add(_history_row(job_id, row))
        add_event(session, job_id=job_id, type="history", data=row)
    return True


def replace_history(session: Session, *, job_id: str, rows: list[dict[str, Any]]) -> None:
    """The pipeline's whole log at the job's end replaces the rows recorded as it ran (it
    brings back any a database outage kept from being written)."""
    session.execute(delete(JobHistory).where(JobHistory.job_id == job_id))
    session.add_all(_history_row(job_id, row) for row in rows)


def _history_row(job_id: str, row: dict[str, Any]) -> JobHistory:
    return JobHistory(job_id=job_id, **{k: row.get(k) for k in HISTORY_COLUMNS})
