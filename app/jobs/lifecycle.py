"""Every change of a job's state, in one place: create, claim, heartbeat, progress, stage,
finish, cancel, release, and a search's wait for its branches. Each goes through the
transitions in `app.jobs.states` (by `move`); an illegal one raises. The API (create, cancel)
and the workers (claim … finish) both call here, and nothing else writes a job's status.

Every write a worker makes is fenced on `worker_id` (`app.jobs.ownership`): a worker that lost
its job (to the reaper, or to its supervisor) can no longer change it.

Beside it in app/jobs: `states` (the transitions as data), `workers` (worker presence),
`search` (a search's branches and candidates), `history` (epochs), `reaper` (the pass that
finds jobs whose worker is gone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, or_, select, update
from sqlalchemy.orm import Session

from app.core.db import insert_if_absent
from app.core.errors import public_message
from app.jobs import attempts as stage_attempts
from app.jobs import search
from app.jobs.events import add_event
from app.jobs.history import replace_history
from app.jobs.ownership import owned
from app.jobs.states import TERMINAL, JobStatus, StageStatus, check_transition, sources
from app.models import Artifact, Job, JobStage, new_id, utcnow
from app.webhooks import outbox
from distillery_contract.errors import ErrorCode
from distillery_contract.webhooks import TERMINAL_EVENTS, WebhookEvent

Enqueue = Callable[[str, str], None]  # (job id, queue): sends the job's message


def move(session: Session, job: Job, to: JobStatus, *, now: datetime, **event: Any) -> None:
    """The one place a loaded job changes status: checked, timestamped, and announced (an
    event, and for an end the webhooks, recorded in this same transaction)."""
    check_transition(job.id, job.status, to)
    job.status, job.updated_at = to, now
    if to in TERMINAL:
        job.finished_at = now
        outbox.record(session, job=job, event=TERMINAL_EVENTS[to])
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
        job.error_code, job.error_message = ErrorCode.CANCELLED, "cancelled before it started"
        move(session, job, JobStatus.CANCELLED, now=now)
    elif job.status == JobStatus.RUNNING:
        move(session, job, JobStatus.CANCELLING, now=now)
    branches = search.branches_of(session, job.id)
    for branch in branches:  # a search stops all its branches
        cancel(session, job=branch)
    session.flush()
    if branches and job.worker_id is None and search.branches_ended(session, job_id=job.id):
        # A waiting search whose branches all ended now: nobody else will end it.
        job.error_code, job.error_message = ErrorCode.CANCELLED, "cancelled during the search"
        move(session, job, JobStatus.CANCELLED, now=now)
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


def heartbeat(session: Session, *, job_id: str, worker_id: str) -> tuple[bool, bool]:
    """Returns (still_owner, cancel_requested)."""
    still_owner = session.execute(
        update(Job)
        .where(owned(job_id, worker_id))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if not still_owner:
        return False, False
    return True, bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def set_progress(
    session: Session, *, job_id: str, worker_id: str, stage: str, progress: float
) -> bool:
    return bool(
        session.execute(
            update(Job)
            .where(owned(job_id, worker_id))
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
    job = session.scalar(select(Job).where(owned(job_id, worker_id)))
    if job is None:
        return None
    stage = session.scalar(select(JobStage).where(JobStage.job_id == job_id, JobStage.name == name))
    if stage is None:
        return None
    outbox.record(
        session, job=job, event=WebhookEvent.STAGE, detail={"stage": name, "status": status.value}
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
        .where(owned(job_id, worker_id))
        .values(stage=name, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return stage.seconds


def set_model_metrics(
    session: Session, *, job_id: str, worker_id: str, model: str, metrics: dict[str, Any]
) -> None:
    job = session.scalar(select(Job).where(owned(job_id, worker_id)))
    if job is not None:
        job.metrics = {**(job.metrics or {}), model: metrics}


def finish(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    status: JobStatus,
    report: dict[str, Any] | None = None,
    artifacts: list[dict[str, Any]] | None = None,
    error: tuple[ErrorCode, str] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> bool:
    """Move an owned job to a terminal status. `report` (the pipeline's) brings the metrics,
    the gates and the stage records, which settle every stage row even if a progress write
    was lost; `artifacts` replace any earlier attempt's rows; `history` (the pipeline's own
    log of every epoch) replaces the rows recorded as it ran, bringing back any a database
    outage kept from being written."""
    assert status in TERMINAL
    job = session.scalar(select(Job).where(owned(job_id, worker_id)))
    if job is None:
        return False
    now = utcnow()
    job.heartbeat_at = now
    if report is not None:
        job.metrics, job.gates = report["metrics"], report["gates"]
        _settle_stages(session, job_id, report["stages"], now)
        if "candidates" in report:
            search.replace_candidates(session, job_id, report["candidates"])
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
        replace_history(session, job_id=job_id, rows=history)
    if status != JobStatus.SUCCEEDED:
        stage_attempts.interrupt(session, job_id=job_id, at=now)
        ended = StageStatus.CANCELLED if status == JobStatus.CANCELLED else StageStatus.FAILED
        session.execute(
            update(JobStage)
            .where(JobStage.job_id == job_id, JobStage.status == StageStatus.RUNNING)
            .values(status=ended, finished_at=now)
        )
    move(session, job, status, now=now, **event)
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


def wait_for_branches(
    session: Session, *, job_id: str, worker_id: str, count: int
) -> list[tuple[str, str]] | None:
    """The search's teacher is ready: make its `count` branch jobs (once; a re-run finds them)
    and let the parent wait with no worker holding it (its heartbeat cleared, so the reaper
    leaves it be) while the branches run. Returns (branch id, queue) of the branches to send
    after the commit; None when this worker no longer owns the parent."""
    parent = session.scalar(select(Job).where(owned(job_id, worker_id)))
    if parent is None:
        return None
    branches = search.branches_of(session, job_id)
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
    search.set_stage_row(session, job_id, "search", StageStatus.RUNNING)
    message = f"{count} branch(es) queued: one per student, on any worker"
    add_event(session, job_id=job_id, type="log", data={"stage": "search", "message": message})
    session.flush()
    return [(b.id, b.queue) for b in branches if b.status == JobStatus.QUEUED]


# --- lost workers --------------------------------------------------------------------------------


def release(session: Session, job: Job, *, now: datetime, max_attempts: int, reason: str) -> str:
    """Take an active job away from a worker that is gone: re-queued while attempts remain
    (its checkpoints let the next worker resume), else failed `worker_lost`; a cancelling one
    just ends cancelled. Returns what happened: requeued, lost or cancelled."""
    # Its stage stopped at the worker's last sign of life, not now (the reaper notices late).
    last = stage_attempts.last_sign_of_life(job.heartbeat_at, job.updated_at)
    stage_attempts.interrupt(session, job_id=job.id, at=last or now)
    if job.status == JobStatus.CANCELLING:
        job.error_code = ErrorCode.CANCELLED
        job.error_message = "cancelled (its worker stopped responding)"
        move(session, job, JobStatus.CANCELLED, now=now)
        return "cancelled"
    if job.attempts < max_attempts:
        message = f"{reason}; re-queued, attempt {job.attempts + 1} of {max_attempts}"
        add_event(session, job_id=job.id, type="log", data={"stage": job.stage, "message": message})
        job.worker_id, job.enqueued_at = None, None
        move(session, job, JobStatus.QUEUED, now=now)
        return "requeued"
    job.error_code = ErrorCode.WORKER_LOST
    job.error_message = f"the worker stopped heartbeating {job.attempts} time(s); giving up"
    error = {"code": job.error_code, "message": job.error_message}
    move(session, job, JobStatus.FAILED, now=now, error=error)
    return "lost"
