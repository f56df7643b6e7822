"""The fence on every write a worker makes to a job: the job is still active and still held
under the `worker_id` its claim wrote. A worker that lost its job (to the reaper, or to its
supervisor) matches no row, so none of its late writes lands."""

from __future__ import annotations

from sqlalchemy import ColumnElement

from app.jobs.states import ACTIVE
from app.models import Job


def owned(job_id: str, worker_id: str) -> ColumnElement[bool]:
    """The WHERE of a fenced write: `job_id` is active and `worker_id` holds it."""
    return (Job.id == job_id) & (Job.worker_id == worker_id) & Job.status.in_(ACTIVE)
