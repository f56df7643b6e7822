"""A job's event log (what GET /v1/jobs/{id}/events streams): written in the same
transaction as the change it announces."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.models import JobEvent


def add_event(session: Session, *, job_id: str, type: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job_id, type=type, data=data))
