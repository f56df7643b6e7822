"""A search job: a parent job whose branches are child jobs, each measuring candidates. Its
queries (branches, whether they all ended), the claim that takes a waiting search to finish,
its own stage rows, and its candidates. Making the branches is a state change of the parent
and lives in the lifecycle (`lifecycle.wait_for_branches`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.jobs.states import ACTIVE, TERMINAL, StageStatus
from app.models import Job, JobCandidate, JobStage, utcnow


def branches_of(session: Session, job_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.parent_id == job_id).order_by(Job.branch)))


def branches_ended(session: Session, *, job_id: str) -> bool:
    """Every branch of the search has ended (so it can be finished)."""
    statuses = session.scalars(select(Job.status).where(Job.parent_id == job_id)).all()
    return bool(statuses) and all(s in TERMINAL for s in statuses)


def claim_finish(session: Session, *, job_id: str, worker_id: str, progress: float) -> Job | None:
    """Take a waiting search whose branches have all ended, to choose and export (or, if it
    was cancelled meanwhile, to end it). One conditional UPDATE: one worker wins. `progress` is
    where the export starts, so the search's progress does not fall back between its branches'
    end and the export's first event."""
    children = select(Job.id).where(Job.parent_id == job_id)
    running = children.where(Job.status.not_in(TERMINAL))
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_(ACTIVE),
            Job.worker_id.is_(None),
            children.exists(),
            ~running.exists(),
        )
        .values(worker_id=worker_id, heartbeat_at=now, updated_at=now, progress=progress)
        .execution_options(synchronize_session=False)
    ).rowcount
    return session.scalar(select(Job).where(Job.id == job_id)) if claimed else None


def set_stage_row(session: Session, job_id: str, name: str, status: StageStatus) -> None:
    """A search's own stage rows (the parent's `search` stage spans its branches)."""
    row = session.scalar(select(JobStage).where(JobStage.job_id == job_id, JobStage.name == name))
    if row is None:
        return
    now = utcnow()
    row.status = status
    if status == StageStatus.RUNNING:
        row.started_at = row.started_at or now
    else:
        row.finished_at = now
        if row.started_at is not None:
            row.seconds = (now - row.started_at).total_seconds()


def record_candidate(session: Session, *, job_id: str, record: dict[str, Any]) -> None:
    """A branch measured a candidate: the search lists it at once (the front and the choice
    come when every branch has ended)."""
    session.execute(
        delete(JobCandidate).where(JobCandidate.job_id == job_id, JobCandidate.key == record["key"])
    )
    session.add(_candidate(job_id, record, artifacts=[]))


def replace_candidates(session: Session, job_id: str, candidates: list[dict[str, Any]]) -> None:
    """The search's report at its end: every candidate with its gates, front and choice."""
    session.execute(delete(JobCandidate).where(JobCandidate.job_id == job_id))
    session.add_all(_candidate(job_id, c, **{k: c[k] for k in _CHOSEN}) for c in candidates)


_CHOSEN = ("gates", "gates_passed", "on_front", "final", "artifacts")  # known once all ended


def _candidate(job_id: str, c: dict[str, Any], **more: Any) -> JobCandidate:
    return JobCandidate(
        job_id=job_id,
        key=c["key"],
        branch=c["branch"],
        axes=c["axes"],
        metrics=c["metrics"],
        **more,
    )
