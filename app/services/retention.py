"""Retention: the files of jobs that ended `ARTIFACT_TTL_DAYS` ago, and uploads no job used for
`UPLOAD_TTL_DAYS`, deleted. `plan` says what would go (what `distillery gc --dry-run` prints);
`apply` deletes it; the reaper runs `Retention`, which sweeps when a TTL is set and it is due.

A job keeps its row, metrics, stages, history and candidates: only its files go (a search's
branches' with it), its artifact rows are dropped and `artifacts_expired_at` is set, so the API
answers 410 `artifacts_expired` for them. An upload goes whole (row and files), as a DELETE
through the API would, and never while a queued or running job names it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database, insert_if_absent
from app.core.errors import NotFound, UploadInUse
from app.core.storage import Storage, StorageError, job_key
from app.jobs.states import TERMINAL
from app.models import Artifact, Dataset, Job, Sweep, Tenant, UploadedModel, utcnow
from app.services import uploads

log = logging.getLogger("distillery.retention")

SWEEP = "retention"
# The kinds of upload, as `plan` names them.
UPLOAD_MODELS: dict[str, type[Dataset] | type[UploadedModel]] = {
    "dataset": Dataset,
    "model": UploadedModel,
}


@dataclass(frozen=True)
class ExpiredJob:
    id: str
    tenant: str
    finished_at: datetime
    branches: tuple[str, ...]  # a search's branch jobs: their files go with it
    files: int
    bytes: int

    @property
    def prefixes(self) -> list[str]:
        return [job_key(j) for j in (self.id, *self.branches)]


@dataclass(frozen=True)
class UnusedUpload:
    kind: str  # dataset | model
    id: str
    tenant_id: str
    tenant: str
    created_at: datetime
    bytes: int


@dataclass(frozen=True)
class Kept:
    """Planned, not deleted: in use again, gone already, or the store failed."""

    id: str
    reason: str
    store_failed: bool = False


@dataclass
class Plan:
    jobs: list[ExpiredJob] = field(default_factory=list)
    uploads: list[UnusedUpload] = field(default_factory=list)
    more: bool = False  # the batch limit left some for the next pass
    kept: list[Kept] = field(default_factory=list)  # `apply` only

    @property
    def bytes(self) -> int:
        return sum(j.bytes for j in self.jobs) + sum(u.bytes for u in self.uploads)


def plan(
    session: Session,
    storage: Storage,
    *,
    artifact_ttl_days: float | None,
    upload_ttl_days: float | None,
    limit: int | None = None,
    now: datetime | None = None,
) -> Plan:
    """What retention would delete now (a TTL of None: that half is off), oldest first, at
    most `limit` jobs and `limit` uploads. Reads the store (a listing per job), writes nothing."""
    now = now or utcnow()
    out = Plan()
    if artifact_ttl_days is not None:
        cutoff = now - timedelta(days=artifact_ttl_days)
        out.jobs, more = _expired_jobs(session, storage, cutoff, limit)
        out.more |= more
    if upload_ttl_days is not None:
        cutoff = now - timedelta(days=upload_ttl_days)
        out.uploads, more = _unused_uploads(session, cutoff, limit)
        out.more |= more
    return out


def _expired_jobs(
    session: Session, storage: Storage, cutoff: datetime, limit: int | None
) -> tuple[list[ExpiredJob], bool]:
    """Top-level jobs that ended before `cutoff` and whose files are still there. A job that
    never started (cancelled while queued) never had any, and is left alone."""
    query = (
        select(Job.id, Tenant.name, Job.finished_at)
        .join(Tenant, Tenant.id == Job.tenant_id)
        .where(
            Job.artifacts_expired_at.is_(None),
            Job.finished_at < cutoff,
            Job.status.in_(TERMINAL),
            Job.parent_id.is_(None),
            Job.started_at.is_not(None),
        )
        .order_by(Job.finished_at, Job.id)
    )
    rows = session.execute(query.limit(None if limit is None else limit + 1)).all()
    more = limit is not None and len(rows) > limit
    rows = rows[:limit]
    branches: dict[str, list[str]] = {job_id: [] for job_id, _, _ in rows}
    for branch_id, parent_id in session.execute(
        select(Job.id, Job.parent_id).where(Job.parent_id.in_(branches)).order_by(Job.branch)
    ):
        branches[parent_id].append(branch_id)
    found = []
    for job_id, tenant, finished_at in rows:
        files: dict[str, int] = {}
        for one in (job_id, *branches[job_id]):
            files.update(storage.list(job_key(one)))
        found.append(
            ExpiredJob(
                id=job_id,
                tenant=tenant,
                finished_at=finished_at,
                branches=tuple(branches[job_id]),
                files=len(files),
                bytes=sum(files.values()),
            )
        )
    return found, more


def uploads_in_use(session: Session, since: datetime) -> set[tuple[str, str, str]]:
    """(tenant, spec field, upload id) of every upload a job not finished yet names, or one
    created or ended since `since` named. A search's branches name what the search names."""
    rows = session.execute(
        select(Job.tenant_id, Job.spec).where(
            Job.parent_id.is_(None),
            or_(Job.status.not_in(TERMINAL), Job.created_at >= since, Job.finished_at >= since),
        )
    )
    return {(tenant, *named) for tenant, spec in rows for named in uploads.uploads_named(spec)}


def _unused_uploads(
    session: Session, cutoff: datetime, limit: int | None
) -> tuple[list[UnusedUpload], bool]:
    used = uploads_in_use(session, cutoff)
    found: list[UnusedUpload] = []
    for kind, model in UPLOAD_MODELS.items():
        spec_field = uploads.KINDS[model][1]
        rows = session.execute(
            select(model.id, model.tenant_id, Tenant.name, model.created_at, model.bytes)
            .join(Tenant, Tenant.id == model.tenant_id)
            .where(model.created_at < cutoff)
            .order_by(model.created_at, model.id)
        )
        found += [
            UnusedUpload(kind, upload_id, tenant_id, tenant, created_at, size)
            for upload_id, tenant_id, tenant, created_at, size in rows
            if (tenant_id, spec_field, upload_id) not in used
        ]
    found.sort(key=lambda u: (u.created_at, u.id))
    more = limit is not None and len(found) > limit
    return found[:limit], more


def apply(database: Database, storage: Storage, planned: Plan) -> Plan:
    """Delete what `planned` lists, each job and upload in a transaction of its own; returns
    what went, and in `kept` what did not and why. A job's files go first, then its rows
    are marked: a store that fails leaves the job as it was, for the next pass."""
    done = Plan(more=planned.more)
    for job in planned.jobs:
        try:
            for prefix in job.prefixes:
                storage.delete_prefix(prefix)
        except StorageError as e:
            log.warning("retention could not delete the files of %s: %s", job.id, e)
            done.kept.append(Kept(job.id, str(e), store_failed=True))
            continue
        with database.session() as session:
            _mark_expired(session, [job.id, *job.branches])
        done.jobs.append(job)
    for upload in planned.uploads:
        kept = _expire_upload(database, storage, upload)
        if kept is None:
            done.uploads.append(upload)
        else:
            done.kept.append(kept)
    return done


def _mark_expired(session: Session, job_ids: list[str]) -> None:
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.artifacts_expired_at.is_(None))
        .values(artifacts_expired_at=utcnow())
    )
    session.execute(delete(Artifact).where(Artifact.job_id.in_(job_ids)))


def _expire_upload(database: Database, storage: Storage, upload: UnusedUpload) -> Kept | None:
    try:
        with database.session() as session:
            uploads.expire_upload(
                session,
                model=UPLOAD_MODELS[upload.kind],
                tenant_id=upload.tenant_id,
                upload_id=upload.id,
                storage=storage,
            )
    except (UploadInUse, NotFound) as e:  # a job was submitted with it since, or it is gone
        return Kept(upload.id, e.message)
    except StorageError as e:
        log.warning("retention could not delete %s: %s", upload.id, e)
        return Kept(upload.id, str(e), store_failed=True)
    return None


def sweep(
    database: Database,
    storage: Storage,
    *,
    artifact_ttl_days: float | None,
    upload_ttl_days: float | None,
    dry_run: bool = False,
    limit: int | None = None,
) -> Plan:
    """Plan, then (unless `dry_run`) apply: what went, or with `dry_run` what would."""
    with database.session() as session:
        planned = plan(
            session,
            storage,
            artifact_ttl_days=artifact_ttl_days,
            upload_ttl_days=upload_ttl_days,
            limit=limit,
        )
    return planned if dry_run else apply(database, storage, planned)


# --- one reaper at a time ----------------------------------------------------------------------


def claim_turn(session: Session, *, every: float, now: datetime | None = None) -> bool:
    """True for the one caller, of all processes, whose turn it is: its conditional UPDATE
    moved the next run `every` seconds on (a concurrent one waits on the row, then finds the
    condition false). Commit before doing the work, so the others see it."""
    now = now or utcnow()
    insert_if_absent(session, Sweep, {"name": SWEEP, "next_run_at": now}, ["name"])
    moved = session.execute(
        update(Sweep)
        .where(Sweep.name == SWEEP, Sweep.next_run_at <= now)
        .values(next_run_at=now + timedelta(seconds=every))
    )
    return moved.rowcount == 1


def next_turn_soon(session: Session) -> None:
    """A pass stopped at its batch limit: the next reaper pass continues instead of waiting."""
    session.execute(update(Sweep).where(Sweep.name == SWEEP).values(next_run_at=utcnow()))


class Retention:
    """The reaper's retention chore (app/jobs/reaper.py): a sweep when a TTL is set and it is
    this process's turn, at most every RETENTION_INTERVAL_SECONDS over all processes, and
    sooner while more than RETENTION_BATCH remained. Returns the reaper's counts."""

    def __init__(self, database: Database, settings: Settings, storage: Storage) -> None:
        self.database, self.settings, self.storage = database, settings, storage

    def __repr__(self) -> str:
        return "Retention()"

    def __call__(self) -> dict[str, int]:
        s = self.settings
        if s.ARTIFACT_TTL_DAYS is None and s.UPLOAD_TTL_DAYS is None:
            return {}
        with self.database.session() as session:
            if not claim_turn(session, every=s.RETENTION_INTERVAL_SECONDS):
                return {}
        done = sweep(
            self.database,
            self.storage,
            artifact_ttl_days=s.ARTIFACT_TTL_DAYS,
            upload_ttl_days=s.UPLOAD_TTL_DAYS,
            limit=s.RETENTION_BATCH,
        )
        if done.more:
            with self.database.session() as session:
                next_turn_soon(session)
        return {"expired_jobs": len(done.jobs), "expired_uploads": len(done.uploads)}
