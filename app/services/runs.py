"""Jobs as the workers see them: claim, heartbeat, record progress and events, finish, and
the reaper that re-queues (then fails) jobs whose worker stopped heartbeating.

Every write a worker makes is fenced on `worker_id`: a worker that lost its job to the reaper
can no longer change it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, or_, select, update
from sqlalchemy.orm import Session

from app.core.errors import public_message
from app.models import Artifact, Job, JobEvent, JobHistory, JobStage, Worker, utcnow
from worker.pipeline.history import HISTORY_COLUMNS

log = logging.getLogger("distillery.runs")

ACTIVE = ("running", "cancelling")


def mark_enqueued(engine: Engine, *, job_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def claim(
    session: Session, *, job_id: str, worker_id: str, stale_before: datetime, max_attempts: int
) -> Job | None:
    """Take the job if it is queued (or running under a worker that stopped heartbeating).
    Returns the job when this worker now owns it, else None (duplicate message, finished…)."""
    now = utcnow()
    claimed = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempts < max_attempts,
            or_(
                (Job.status == "queued") & (Job.cancel_requested.is_(False)),
                (Job.status == "running") & (Job.heartbeat_at < stale_before),
            ),
        )
        .values(
            status="running",
            worker_id=worker_id,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    job = session.scalar(select(Job).where(Job.id == job_id))
    if job is None or not claimed:
        return None
    if job.started_at is None:
        job.started_at = now
    add_event(
        session, job_id=job_id, type="status", data={"status": "running", "attempt": job.attempts}
    )
    session.flush()
    return job


def heartbeat(session: Session, *, job_id: str, worker_id: str) -> tuple[bool, bool]:
    """Returns (still_owner, cancel_requested)."""
    owned = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(ACTIVE))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if not owned:
        return False, False
    return True, bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def add_event(session: Session, *, job_id: str, type: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job_id, type=type, data=data))


def _owned(job_id: str, worker_id: str):
    return (Job.id == job_id) & (Job.worker_id == worker_id) & Job.status.in_(ACTIVE)


def set_progress(
    session: Session, *, job_id: str, worker_id: str, stage: str, progress: float
) -> bool:
    return bool(
        session.execute(
            update(Job)
            .where(_owned(job_id, worker_id))
            .values(stage=stage, progress=progress, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
    )


def set_stage(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    name: str,
    status: str,
    seconds: float | None = None,
    metrics: dict[str, Any] | None = None,
) -> None:
    if session.scalar(select(Job.id).where(_owned(job_id, worker_id))) is None:
        return
    stage = session.scalar(select(JobStage).where(JobStage.job_id == job_id, JobStage.name == name))
    if stage is None:
        return
    now = utcnow()
    stage.status = status
    if status == "running":
        stage.started_at, stage.finished_at, stage.seconds = now, None, None
    else:
        stage.finished_at = now
        if stage.started_at is None:
            stage.started_at = now
        stage.seconds = seconds
        if metrics is not None:
            stage.metrics = metrics
    session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(stage=name, updated_at=now)
        .execution_options(synchronize_session=False)
    )


def set_model_metrics(
    session: Session, *, job_id: str, worker_id: str, model: str, metrics: dict[str, Any]
) -> None:
    job = session.scalar(select(Job).where(_owned(job_id, worker_id)))
    if job is not None:
        job.metrics = {**(job.metrics or {}), model: metrics}


def record_history(
    session: Session, *, job_id: str, worker_id: str, rows: list[dict[str, Any]]
) -> bool:
    """Store epochs of training runs (HISTORY_COLUMNS rows) and announce each as a `history`
    event. A row replaces its run's rows from its epoch on, as the pipeline's own log does: a
    resumed job writes the epochs it runs again once more. False when the job is not ours."""
    if session.scalar(select(Job.id).where(_owned(job_id, worker_id))) is None:
        return False
    for row in rows:
        session.execute(
            delete(JobHistory).where(
                JobHistory.job_id == job_id,
                JobHistory.run == row["run"],
                JobHistory.epoch >= row["epoch"],
            )
        )
        session.add(JobHistory(job_id=job_id, **{k: row.get(k) for k in HISTORY_COLUMNS}))
        add_event(session, job_id=job_id, type="history", data=row)
    return True


def finish(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    status: str,
    metrics: dict[str, Any] | None = None,
    gates: list[dict[str, Any]] | None = None,
    artifacts: list[dict[str, Any]] | None = None,
    error: tuple[str, str] | None = None,
    stages: list[dict[str, Any]] | None = None,
) -> bool:
    """Move an owned job to a terminal status; artifacts replace any earlier attempt's rows.
    `stages` (the report's records) settle every stage row, even if a progress write was lost."""
    job = session.scalar(select(Job).where(_owned(job_id, worker_id)))
    if job is None:
        return False
    now = utcnow()
    job.status = status
    job.finished_at = now
    job.heartbeat_at = now
    if metrics is not None:
        job.metrics = metrics
    if gates is not None:
        job.gates = gates
    if status == "succeeded":
        job.progress = 1.0
    if error is not None:
        # The one exit of a job's error to its owner: messages quote OS and library errors,
        # which name files in the worker's storage and home.
        error = (error[0], public_message(error[1]))
        job.error_code, job.error_message = error
    for record in stages or []:
        row = session.scalar(
            select(JobStage).where(JobStage.job_id == job_id, JobStage.name == record["name"])
        )
        if row is not None and row.status != "succeeded":
            row.status, row.seconds = "succeeded", record.get("seconds")
            row.metrics = record.get("metrics") or {}
            row.finished_at = row.finished_at or now
    if artifacts is not None:
        session.execute(delete(Artifact).where(Artifact.job_id == job_id))
        for a in artifacts:
            session.add(Artifact(job_id=job_id, **a))
    if status != "succeeded":
        session.execute(
            update(JobStage)
            .where(JobStage.job_id == job_id, JobStage.status == "running")
            .values(status="cancelled" if status == "cancelled" else "failed", finished_at=now)
        )
    add_event(
        session,
        job_id=job_id,
        type="status",
        data={
            "status": status,
            **({"error": {"code": error[0], "message": error[1]}} if error else {}),
        },
    )
    return True


def job_for_run(session: Session, *, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id))


def mark_cancelled_if_requested(session: Session, *, job_id: str) -> None:
    """A queued job that was cancelled before a worker saw it: make sure it reads cancelled."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(True))
        .values(status="cancelled", finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def _release(session: Session, job: Job, *, now: datetime, max_attempts: int, reason: str) -> str:
    """Take a running job away from a worker that is gone: re-queued while attempts remain
    (its checkpoints let the next worker resume), else failed `worker_lost`; a cancelling one
    just ends cancelled. Returns what happened: requeued, lost or cancelled."""
    job.updated_at = now
    if job.status == "cancelling":
        job.status, job.finished_at = "cancelled", now
        job.error_code, job.error_message = "cancelled", "cancelled (its worker stopped responding)"
        add_event(session, job_id=job.id, type="status", data={"status": "cancelled"})
        return "cancelled"
    if job.attempts < max_attempts:
        job.status, job.worker_id, job.enqueued_at = "queued", None, None
        message = f"{reason}; re-queued, attempt {job.attempts + 1} of {max_attempts}"
        add_event(session, job_id=job.id, type="log", data={"stage": job.stage, "message": message})
        add_event(session, job_id=job.id, type="status", data={"status": "queued"})
        return "requeued"
    job.status, job.finished_at = "failed", now
    job.error_code = "worker_lost"
    job.error_message = f"the worker stopped heartbeating {job.attempts} time(s); giving up"
    error = {"code": "worker_lost", "message": job.error_message}
    add_event(session, job_id=job.id, type="status", data={"status": "failed", "error": error})
    return "lost"


# --- worker processes --------------------------------------------------------------------------


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
    now = utcnow()
    reason = f"worker {worker} died"
    released = [
        (j, _release(session, j, now=now, max_attempts=max_attempts, reason=reason)) for j in jobs
    ]
    session.flush()
    return [(j.id, j.queue) for j, what in released if what == "requeued"]


def reap(
    session: Session,
    *,
    heartbeat_timeout: float,
    max_attempts: int,
    enqueue: Callable[[str, str], None],
    queue_size: Callable[[str], int | None] | None = None,
    resend_after: float = 60.0,
) -> dict[str, int]:
    """One reaper pass; safe to run in many processes at once (rows are locked and skipped).

    - running/cancelling with no heartbeat for `heartbeat_timeout`: re-queued while attempts
      remain, else failed `worker_lost` (a cancelling one just ends cancelled);
    - queued whose message never went out (broker was down at submit): sent now;
    - queued whose message went out more than `resend_after` ago while the broker's queue is
      empty (the broker lost it, e.g. a restart without persistence): sent again. A duplicate
      message is harmless: only one worker can claim a job.
    """
    now = utcnow()
    stale = now - timedelta(seconds=heartbeat_timeout)
    counts = {"requeued": 0, "lost": 0, "cancelled": 0, "sent": 0}
    rows = session.scalars(
        select(Job)
        .where(Job.status.in_(ACTIVE), Job.heartbeat_at < stale)
        .with_for_update(skip_locked=True)
        .limit(100)
    ).all()
    to_send: list[tuple[str, str]] = []
    reason = f"worker lost (no heartbeat for {heartbeat_timeout:.0f}s)"
    for job in rows:
        counts[_release(session, job, now=now, max_attempts=max_attempts, reason=reason)] += 1
    # Worker processes silent as long are gone too (killed without a supervisor to tell).
    session.execute(delete(Worker).where(Worker.heartbeat_at < stale))
    unsent = session.scalars(
        select(Job)
        .where(Job.status == "queued", Job.enqueued_at.is_(None))
        .with_for_update(skip_locked=True)
        .limit(100)
    ).all()
    to_send += [(j.id, j.queue) for j in unsent]
    if queue_size is not None:
        cutoff = now - timedelta(seconds=resend_after)
        waiting = select(Job).where(Job.status == "queued", Job.enqueued_at < cutoff)
        for queue in session.scalars(waiting.with_only_columns(Job.queue).distinct()).all():
            if queue_size(queue) == 0:
                lost = session.scalars(
                    waiting.where(Job.queue == queue).with_for_update(skip_locked=True).limit(100)
                )
                to_send += [(j.id, j.queue) for j in lost]
    session.flush()
    for job_id, queue in to_send:
        try:
            enqueue(job_id, queue)
        except Exception:
            log.warning("reaper could not enqueue %s; will retry", job_id, exc_info=True)
            break
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
        counts["sent"] += 1
    return counts
