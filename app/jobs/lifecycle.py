"""Every change of a job's state, in one place: create, claim, heartbeat, progress, stage,
finish, cancel, release, reap. Each goes through the transitions in `app.jobs.states`; an
illegal one raises. The API (create, cancel) and the workers (claim … finish) both call here,
and nothing else writes a job's status.

Every write a worker makes is fenced on `worker_id`: a worker that lost its job (to the
reaper, or to its supervisor) can no longer change it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, or_, select, update
from sqlalchemy.orm import Session

from app.core.db import insert_if_absent
from app.core.errors import public_message
from app.jobs import attempts as stage_attempts
from app.jobs.states import ACTIVE, TERMINAL, JobStatus, StageStatus, check_transition, sources
from app.models import (
    Artifact,
    Job,
    JobCandidate,
    JobEvent,
    JobHistory,
    JobStage,
    Worker,
    new_id,
    utcnow,
)
from app.webhooks import outbox
from worker.pipeline.history import HISTORY_COLUMNS

log = logging.getLogger("distillery.lifecycle")

Enqueue = Callable[[str, str], None]  # (job id, queue): sends the job's message


def add_event(session: Session, *, job_id: str, type: str, data: dict[str, Any]) -> None:
    session.add(JobEvent(job_id=job_id, type=type, data=data))


def _move(session: Session, job: Job, to: JobStatus, *, now: datetime, **event: Any) -> None:
    """The one place a loaded job changes status: checked, timestamped, and announced (an
    event, and for an end the webhooks, recorded in this same transaction)."""
    check_transition(job.id, job.status, to)
    job.status, job.updated_at = to, now
    if to in TERMINAL:
        job.finished_at = now
        outbox.record(session, job=job, event=outbox.TERMINAL_EVENTS[to.value])
    add_event(session, job_id=job.id, type="status", data={"status": to.value, **event})


# --- the API side ------------------------------------------------------------------------------


def create(
    session: Session,
    *,
    tenant_id: str,
    name: str,
    spec: dict[str, Any],
    queue: str,
    stages: Iterable[str],
    idempotency_key: str | None,
    request_hash: str,
) -> Job | None:
    """A new queued job with its planned stages, flushed (the caller sends its message after
    the commit). None when a concurrent request with the same idempotency key made it first."""
    job_id = new_id("job")
    values = {
        "id": job_id,
        "tenant_id": tenant_id,
        "name": name,
        "status": JobStatus.QUEUED,
        "progress": 0.0,
        "spec": spec,
        "metrics": {},
        "queue": queue,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "attempts": 0,
        "cancel_requested": False,
    }
    if not insert_if_absent(session, Job, values, ["tenant_id", "idempotency_key"]):
        return None
    for position, stage in enumerate(stages):
        session.add(
            JobStage(
                job_id=job_id, name=stage, status=StageStatus.PENDING, position=position, metrics={}
            )
        )
    add_event(session, job_id=job_id, type="status", data={"status": JobStatus.QUEUED.value})
    session.flush()
    return session.scalars(select(Job).where(Job.id == job_id)).one()


def cancel(session: Session, *, job: Job) -> bool:
    """Queued: cancelled at once (a worker that later gets the message skips it). Running:
    cancelling, and the worker stops at the next batch boundary. False when already ended."""
    if job.status in TERMINAL:
        return False
    job.cancel_requested = True
    now = utcnow()
    if job.status == JobStatus.QUEUED:
        job.error_code, job.error_message = "cancelled", "cancelled before it started"
        _move(session, job, JobStatus.CANCELLED, now=now)
    elif job.status == JobStatus.RUNNING:
        _move(session, job, JobStatus.CANCELLING, now=now)
    branches = branches_of(session, job.id)
    for branch in branches:  # a search stops all its branches
        cancel(session, job=branch)
    session.flush()
    if branches and job.worker_id is None and branches_ended(session, job_id=job.id):
        # A waiting search whose branches all ended now: nobody else will end it.
        job.error_code, job.error_message = "cancelled", "cancelled during the search"
        _move(session, job, JobStatus.CANCELLED, now=now)
        session.flush()
    return True


def mark_enqueued(engine: Engine, *, job_id: str) -> None:
    """The job's message went out (recorded on its own connection, after the commit)."""
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


# --- the worker side -----------------------------------------------------------------------------


def claim(
    session: Session, *, job_id: str, worker_id: str, stale_before: datetime, max_attempts: int
) -> Job | None:
    """Take the job if it is queued (or running under a worker that stopped heartbeating).
    Returns the job when this worker now owns it, else None (duplicate message, finished…).
    One conditional UPDATE: two workers with the same message cannot both win."""
    assert sources(JobStatus.RUNNING) == {JobStatus.QUEUED, JobStatus.RUNNING}
    now = utcnow()
    # A redelivered job whose worker went silent: its stages stopped at its last heartbeat.
    before = session.execute(
        select(Job.status, Job.heartbeat_at, Job.updated_at).where(Job.id == job_id)
    ).one_or_none()
    claimed = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempts < max_attempts,
            or_(
                (Job.status == JobStatus.QUEUED) & (Job.cancel_requested.is_(False)),
                (Job.status == JobStatus.RUNNING) & (Job.heartbeat_at < stale_before),
            ),
        )
        .values(
            status=JobStatus.RUNNING,
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
    if before is not None and before.status == JobStatus.RUNNING:
        last = stage_attempts.last_sign_of_life(before.heartbeat_at, before.updated_at)
        stage_attempts.interrupt(session, job_id=job_id, at=last or now)
    if job.started_at is None:
        job.started_at = now
    data = {"status": JobStatus.RUNNING.value, "attempt": job.attempts}
    add_event(session, job_id=job_id, type="status", data=data)
    session.flush()
    return job


def _owned(job_id: str, worker_id: str):
    return (Job.id == job_id) & (Job.worker_id == worker_id) & Job.status.in_(ACTIVE)


def heartbeat(session: Session, *, job_id: str, worker_id: str) -> tuple[bool, bool]:
    """Returns (still_owner, cancel_requested)."""
    owned = session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if not owned:
        return False, False
    return True, bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


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
    status: StageStatus,
    seconds: float | None = None,
    metrics: dict[str, Any] | None = None,
    resumed: bool = False,
) -> float | None:
    """Record a stage's start or end; returns its `seconds` as recorded (None while it runs).
    `resumed`: an earlier attempt finished it and this one only reloaded it, so its record
    (times, metrics) stands."""
    job = session.scalar(select(Job).where(_owned(job_id, worker_id)))
    if job is None:
        return None
    stage = session.scalar(select(JobStage).where(JobStage.job_id == job_id, JobStage.name == name))
    if stage is None:
        return None
    outbox.record(
        session, job=job, event="job.stage", detail={"stage": name, "status": status.value}
    )
    now = utcnow()
    stage.status = status
    if status == StageStatus.RUNNING:
        stage_attempts.begin(stage, attempt=job.attempts, now=now)
    elif not resumed:
        stage_attempts.end(stage, attempt=job.attempts, now=now, seconds=seconds)
        if metrics is not None:
            stage.metrics = metrics
    session.execute(
        update(Job)
        .where(_owned(job_id, worker_id))
        .values(stage=name, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return stage.seconds


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
        session.add(_history_row(job_id, row))
        add_event(session, job_id=job_id, type="history", data=row)
    return True


def _history_row(job_id: str, row: dict[str, Any]) -> JobHistory:
    return JobHistory(job_id=job_id, **{k: row.get(k) for k in HISTORY_COLUMNS})


def finish(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    status: JobStatus,
    report: dict[str, Any] | None = None,
    artifacts: list[dict[str, Any]] | None = None,
    error: tuple[str, str] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> bool:
    """Move an owned job to a terminal status. `report` (the pipeline's) brings the metrics,
    the gates and the stage records, which settle every stage row even if a progress write
    was lost; `artifacts` replace any earlier attempt's rows; `history` (the pipeline's own
    log of every epoch) replaces the rows recorded as it ran, bringing back any a database
    outage kept from being written."""
    assert status in TERMINAL
    job = session.scalar(select(Job).where(_owned(job_id, worker_id)))
    if job is None:
        return False
    now = utcnow()
    job.heartbeat_at = now
    if report is not None:
        job.metrics, job.gates = report["metrics"], report["gates"]
        _settle_stages(session, job_id, report["stages"], now)
        if "candidates" in report:
            _replace_candidates(session, job_id, report["candidates"])
    if status == JobStatus.SUCCEEDED:
        job.progress = 1.0
    event: dict[str, Any] = {}
    if error is not None:
        # The one exit of a job's error to its owner: messages quote OS and library errors,
        # which name files in the worker's storage and home.
        job.error_code, job.error_message = error[0], public_message(error[1])
        event["error"] = {"code": job.error_code, "message": job.error_message}
    if artifacts is not None:
        session.execute(delete(Artifact).where(Artifact.job_id == job_id))
        session.add_all(Artifact(job_id=job_id, **a) for a in artifacts)
    if history is not None:
        session.execute(delete(JobHistory).where(JobHistory.job_id == job_id))
        session.add_all(_history_row(job_id, row) for row in history)
    if status != JobStatus.SUCCEEDED:
        stage_attempts.interrupt(session, job_id=job_id, at=now)
        ended = StageStatus.CANCELLED if status == JobStatus.CANCELLED else StageStatus.FAILED
        session.execute(
            update(JobStage)
            .where(JobStage.job_id == job_id, JobStage.status == StageStatus.RUNNING)
            .values(status=ended, finished_at=now)
        )
    _move(session, job, status, now=now, **event)
    return True


def _settle_stages(session: Session, job_id: str, records: list[dict], now: datetime) -> None:
    for record in records:
        row = session.scalar(
            select(JobStage).where(JobStage.job_id == job_id, JobStage.name == record["name"])
        )
        if row is not None and row.status != StageStatus.SUCCEEDED:
            row.status, row.seconds = StageStatus.SUCCEEDED, record.get("seconds")
            row.metrics = record.get("metrics") or {}
            row.finished_at = row.finished_at or now


# --- search jobs: a parent job whose branches are child jobs ---------------------------------


def branches_of(session: Session, job_id: str) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.parent_id == job_id).order_by(Job.branch)))


def wait_for_branches(
    session: Session, *, job_id: str, worker_id: str, count: int
) -> list[tuple[str, str]] | None:
    """The search's teacher is ready: make its `count` branch jobs (once; a re-run finds them)
    and let the parent wait with no worker holding it (its heartbeat cleared, so the reaper
    leaves it be) while the branches run. Returns (branch id, queue) of the branches to send
    after the commit; None when this worker no longer owns the parent."""
    parent = session.scalar(select(Job).where(_owned(job_id, worker_id)))
    if parent is None:
        return None
    branches = branches_of(session, job_id)
    for i in range(len(branches), count):
        branch = create(
            session,
            tenant_id=parent.tenant_id,
            name=f"{parent.name} · branch {i}",
            spec=parent.spec,
            queue=parent.queue,
            stages=["branch"],
            idempotency_key=None,
            request_hash=parent.request_hash or "",
        )
        assert branch is not None
        branch.parent_id, branch.branch = parent.id, i
        branches.append(branch)
    parent.worker_id, parent.heartbeat_at, parent.stage = None, None, "search"
    set_stage_row(session, job_id, "search", StageStatus.RUNNING)
    message = f"{count} branch(es) queued: one per student, on any worker"
    add_event(session, job_id=job_id, type="log", data={"stage": "search", "message": message})
    session.flush()
    return [(b.id, b.queue) for b in branches if b.status == JobStatus.QUEUED]


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
    session.add(
        JobCandidate(
            job_id=job_id,
            key=record["key"],
            branch=record["branch"],
            axes=record["axes"],
            metrics=record["metrics"],
            artifacts=[],
        )
    )


def _replace_candidates(session: Session, job_id: str, candidates: list[dict[str, Any]]) -> None:
    session.execute(delete(JobCandidate).where(JobCandidate.job_id == job_id))
    session.add_all(
        JobCandidate(
            job_id=job_id,
            key=c["key"],
            branch=c["branch"],
            axes=c["axes"],
            metrics=c["metrics"],
            gates=c["gates"],
            gates_passed=c["gates_passed"],
            on_front=c["on_front"],
            final=c["final"],
            artifacts=c["artifacts"],
        )
        for c in candidates
    )


# --- lost workers --------------------------------------------------------------------------------


def release(session: Session, job: Job, *, now: datetime, max_attempts: int, reason: str) -> str:
    """Take an active job away from a worker that is gone: re-queued while attempts remain
    (its checkpoints let the next worker resume), else failed `worker_lost`; a cancelling one
    just ends cancelled. Returns what happened: requeued, lost or cancelled."""
    # Its stage stopped at the worker's last sign of life, not now (the reaper notices late).
    last = stage_attempts.last_sign_of_life(job.heartbeat_at, job.updated_at)
    stage_attempts.interrupt(session, job_id=job.id, at=last or now)
    if job.status == JobStatus.CANCELLING:
        job.error_code, job.error_message = "cancelled", "cancelled (its worker stopped responding)"
        _move(session, job, JobStatus.CANCELLED, now=now)
        return "cancelled"
    if job.attempts < max_attempts:
        message = f"{reason}; re-queued, attempt {job.attempts + 1} of {max_attempts}"
        add_event(session, job_id=job.id, type="log", data={"stage": job.stage, "message": message})
        job.worker_id, job.enqueued_at = None, None
        _move(session, job, JobStatus.QUEUED, now=now)
        return "requeued"
    job.error_code = "worker_lost"
    job.error_message = f"the worker stopped heartbeating {job.attempts} time(s); giving up"
    error = {"code": job.error_code, "message": job.error_message}
    _move(session, job, JobStatus.FAILED, now=now, error=error)
    return "lost"


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
    now, reason = utcnow(), f"worker {worker} died"
    released = [
        (j, release(session, j, now=now, max_attempts=max_attempts, reason=reason)) for j in jobs
    ]
    session.flush()
    return [(j.id, j.queue) for j, what in released if what == "requeued"]


def reap(
    session: Session,
    *,
    heartbeat_timeout: float,
    max_attempts: int,
    enqueue: Enqueue,
    queue_size: Callable[[str], int | None] | None = None,
    resend_after: float = 60.0,
) -> dict[str, int]:
    """One reaper pass; safe to run in many processes at once (rows are locked and skipped).

    - running/cancelling with no heartbeat for `heartbeat_timeout`: released (see `release`);
    - worker processes as silent: forgotten;
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
    reason = f"worker lost (no heartbeat for {heartbeat_timeout:.0f}s)"
    for job in rows:
        counts[release(session, job, now=now, max_attempts=max_attempts, reason=reason)] += 1
    session.execute(delete(Worker).where(Worker.heartbeat_at < stale))
    cutoff = now - timedelta(seconds=resend_after)
    to_send = _unsent(session) + _lost_messages(session, cutoff, queue_size)
    to_send += _searches_left_waiting(session, cutoff)
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


def _searches_left_waiting(session: Session, cutoff: datetime) -> list[tuple[str, str]]:
    """Searches whose branches all ended but that nobody took to finish (the message the last
    branch sent was lost): sent again."""
    waiting = session.scalars(
        select(Job)
        .where(
            Job.status.in_(ACTIVE),
            Job.worker_id.is_(None),
            Job.parent_id.is_(None),
            Job.updated_at < cutoff,
        )
        .limit(100)
    ).all()
    return [(j.id, j.queue) for j in waiting if branches_ended(session, job_id=j.id)]


def _unsent(session: Session) -> list[tuple[str, str]]:
    """Queued jobs whose message never went out (the broker was down at submit)."""
    rows = session.scalars(
        select(Job)
        .where(Job.status == JobStatus.QUEUED, Job.enqueued_at.is_(None))
        .with_for_update(skip_locked=True)
        .limit(100)
    ).all()
    return [(j.id, j.queue) for j in rows]


def _lost_messages(
    session: Session, cutoff: datetime, queue_size: Callable[[str], int | None] | None
) -> list[tuple[str, str]]:
    """Queued jobs sent before `cutoff` whose broker queue is empty: the broker lost them."""
    if queue_size is None:
        return []
    waiting = select(Job).where(Job.status == JobStatus.QUEUED, Job.enqueued_at < cutoff)
    out: list[tuple[str, str]] = []
    for queue in session.scalars(waiting.with_only_columns(Job.queue).distinct()).all():
        if queue_size(queue) == 0:
            lost = session.scalars(
                waiting.where(Job.queue == queue).with_for_update(skip_locked=True).limit(100)
            )
            out += [(j.id, j.queue) for j in lost]
    return out
