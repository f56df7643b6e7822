"""Worker presence: the `workers` table of live worker processes (readiness asks for one per
queue), and what happens to a dead one's jobs. A job attempt's `worker_id` is its process's
name, `/`, and a fresh token (see `worker_name`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.jobs import lifecycle
from app.jobs.states import ACTIVE
from app.models import Job, Worker, utcnow


def worker_name(hostname: str, pid: int) -> str:
    """A worker process's name in the `workers` table (what its supervisor can name from the
    outside); each job attempt's `worker_id` starts with it, then `/` and a fresh token."""
    return f"{hostname}:{pid}"


def register_worker(
    session: Session, *, worker: str, hostname: str, pid: int, queues: list[str]
) -> None:
    """Record a live worker process (or refresh it): readiness asks for one per queue."""
    row = session.get(Worker, worker)
    if row is None:
        session.add(Worker(id=worker, hostname=hostname, pid=pid, queues=queues))
    else:
        row.queues, row.heartbeat_at = queues, utcnow()
    session.flush()


def worker_heartbeat(session: Session, *, worker: str) -> bool:
    """False when the row is gone (someone saw this worker as dead): re-register then."""
    return bool(
        session.execute(
            update(Worker).where(Worker.id == worker).values(heartbeat_at=utcnow())
        ).rowcount
    )


def forget_worker(session: Session, *, worker: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker))


def forget_silent_workers(session: Session, *, before: datetime) -> None:
    """Worker processes with no heartbeat since `before` (the reaper's pass)."""
    session.execute(delete(Worker).where(Worker.heartbeat_at < before))


def live_workers(session: Session, *, queue: str, heartbeat_timeout: float) -> list[Worker]:
    fresh = utcnow() - timedelta(seconds=heartbeat_timeout)
    rows = session.scalars(select(Worker).where(Worker.heartbeat_at >= fresh)).all()
    return [w for w in rows if queue in (w.queues or [])]


def release_worker(session: Session, *, worker: str, max_attempts: int) -> list[tuple[str, str]]:
    """A worker process is known to be dead (its supervisor reaped it): forget it, and
    release its jobs at once instead of after the heartbeat timeout. Returns (job id, queue)
    of the re-queued jobs, for the caller to send once this commits."""
    forget_worker(session, worker=worker)
    jobs = session.scalars(
        select(Job)
        .where(Job.status.in_(ACTIVE), Job.worker_id.startswith(f"{worker}/", autoescape=True))
        .with_for_update()
    ).all()
    now, reason = utcnow(), f"worker {worker} died"
    released = [
        (j, lifecycle.release(session, j, now=now, max_attempts=max_attempts, reason=reason))
        for j in jobs
    ]
    session.flush()
    return [(j.id, j.queue) for j, what in released if what == "requeued"]
