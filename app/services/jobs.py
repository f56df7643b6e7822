"""Jobs as the API sees them: create (idempotent), read, list, cancel, events, artifacts.
State changes go through app.jobs.lifecycle."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import after_commit
from app.core.errors import (
    ArtifactNotFound,
    ArtifactsExpired,
    IdempotencyConflict,
    JobNotFound,
    JobStateConflict,
    QuotaExceeded,
    SpecInvalid,
)
from app.core.storage import Storage, job_key, open_storage, remove_after_commit
from app.jobs import lifecycle
from app.jobs.lifecycle import Enqueue
from app.jobs.states import ACTIVE, TERMINAL, JobStatus, StageStatus
from app.models import (
    Artifact,
    Dataset,
    Job,
    JobCandidate,
    JobEvent,
    JobHistory,
    JobStage,
    UploadedModel,
    utcnow,
)
from app.schemas.jobs import BranchPublic, ErrorPublic, JobPublic, StagePublic
from app.webhooks import targets
from worker.pipeline.errors import SpecError
from worker.pipeline.spec import (
    ImageFolderDataset,
    JobSpec,
    NpzDataset,
    OnnxTeacher,
    SafetensorsInit,
    SafetensorsTeacher,
    TorchScriptTeacher,
    TorchvisionDataset,
    UploadedDataset,
    UploadedInit,
    UploadedTeacher,
    check_opaque_teacher,
)

if TYPE_CHECKING:
    from worker.pipeline import preflight

log = logging.getLogger("distillery.jobs")

# --- enqueue after commit ---------------------------------------------------------------------


def send_job(session: Session, *, job_id: str, queue: str, enqueue: Enqueue) -> None:
    """Enqueue after commit and record that the message went out. If the broker is down, or
    the record cannot be written, the job stays with enqueued_at NULL and the reaper sends it
    (again) later; a duplicate message is harmless, the worker's claim takes a job once."""

    engine = session.get_bind()

    def send() -> None:
        try:
            enqueue(job_id, queue)
        except Exception:  # broker unreachable: the reaper retries
            log.warning("enqueue of %s failed; the reaper will retry", job_id, exc_info=True)
            return
        try:
            lifecycle.mark_enqueued(engine, job_id=job_id)
        except Exception:  # the job is stored and its message sent: the request succeeded
            log.warning("recording that %s was sent failed", job_id, exc_info=True)

    after_commit(session, send)


# --- spec checks a service needs beyond the schema -----------------------------------------


def _shape_of_dataset(
    session: Session, tenant_id: str, spec: JobSpec
) -> tuple[tuple[int, ...], int] | None:
    from worker.pipeline.data import known_shape

    ds = spec.dataset
    if isinstance(ds, UploadedDataset):
        # FOR SHARE: a concurrent DELETE of the upload waits for this job, then sees it.
        row = session.scalar(
            select(Dataset)
            .where(Dataset.id == ds.id, Dataset.tenant_id == tenant_id)
            .with_for_update(read=True)
        )
        if row is None:
            raise SpecInvalid(
                f"dataset.id: no dataset {ds.id!r}; upload one with POST /v1/datasets"
            )
        shape = tuple(row.input_shape)
        if row.kind == "imagefolder":
            shape = (1 if ds.grayscale else 3, ds.image_size, ds.image_size)
        return shape, row.num_classes
    return known_shape(ds)


def validate_for_service(
    session: Session,
    *,
    tenant_id: str,
    spec: JobSpec,
    settings: Settings,
    storage: Storage | None = None,
) -> JobSpec:
    """Refuse what a remote user may not ask for, and what cannot fit together, before queueing.

    Returns the spec as it will run (torchvision data root set by the service). `storage`
    holds the uploads whose headers are read (starting weights); default: the settings' store.
    """
    ds = spec.dataset
    if isinstance(ds, NpzDataset | ImageFolderDataset):
        raise SpecInvalid(
            f"dataset.source: {ds.source!r} reads a path on the server; upload the file with "
            'POST /v1/datasets and use {"source": "upload", "id": "<dataset id>"}'
        )
    if isinstance(spec.teacher, TorchScriptTeacher | OnnxTeacher | SafetensorsTeacher):
        raise SpecInvalid(
            f"teacher.source: {spec.teacher.source!r} reads a path on the server; upload the model "
            'with POST /v1/models and use {"source": "upload", "id": "<model id>"}'
        )
    queue = spec.queue or settings.DEFAULT_QUEUE
    if not settings.queue_allowed(queue):
        known = ", ".join(map(repr, dict.fromkeys([settings.DEFAULT_QUEUE, *settings.JOB_QUEUES])))
        raise SpecInvalid(
            f"queue: {queue!r} is not a job queue of this service; it has {known} "
            "(the operator's DEFAULT_QUEUE and JOB_QUEUES)"
        )
    # Imported here: the preflight builds models with torch, and the webhook worker, which
    # reads jobs through this module, has no use for it.
    from worker.pipeline import preflight

    for ref in preflight.inits_of(spec):
        if isinstance(ref.init, SafetensorsInit):
            raise SpecInvalid(
                f"{ref.field}.source: 'safetensors' reads a path on the server; upload the "
                "weights with POST /v1/models (format safetensors, with their arch) and use "
                '{"source": "upload", "id": "<model id>"}'
            )
    if spec.webhook is not None:
        try:
            targets.check(
                spec.webhook.url,
                allow_http=settings.WEBHOOK_ALLOW_HTTP,
                allow_private=settings.WEBHOOK_ALLOW_PRIVATE,
            )
        except targets.UnsafeTarget as e:
            raise SpecInvalid(f"webhook.url: {e}") from None
    if isinstance(ds, TorchvisionDataset):
        if ds.download and not settings.ALLOW_DATASET_DOWNLOAD:
            raise SpecInvalid(
                "dataset.download: this service does not download datasets; its operator pre-fills the data root"
            )
        # The worker reads it from its own DATA_ROOT (worker/uploads.py): a tenant neither
        # chooses a server folder nor sees which one it is in the job's spec or model card.
        default_root = TorchvisionDataset.model_fields["root"].default
        spec = spec.model_copy(update={"dataset": ds.model_copy(update={"root": default_root})})

    limits = settings.spec_limits()
    teacher = preflight.teacher_of(spec)
    try:
        # First, before anything is built or looked up: what the spec asks for is bounded.
        preflight.check_bounds([*preflight.students_of(spec), teacher], limits)
        preflight.check_candidates(spec, limits)
        shape = _shape_of_dataset(session, tenant_id, spec)
        if isinstance(spec.teacher, UploadedTeacher):
            teacher = _uploaded_teacher(session, tenant_id, spec, shape)
        if shape is not None:
            preflight.preflight(
                spec, input_shape=shape[0], num_classes=shape[1], limits=limits, teacher=teacher
            )
        if preflight.inits_of(spec):  # a store is opened only when there is a header to read
            _check_inits(session, tenant_id, spec, shape, storage or open_storage(settings))
    except SpecError as e:  # the pipeline's refusal, already naming the field
        raise SpecInvalid(e.message) from None
    return spec


def _uploaded_teacher(
    session: Session, tenant_id: str, spec: JobSpec, shape: tuple[tuple[int, ...], int] | None
) -> preflight.ArchRef | None:
    """Check an uploaded teacher against the dataset; return its arch when it has one (a
    safetensors upload), for the preflight to build."""
    teacher = spec.teacher
    assert isinstance(teacher, UploadedTeacher)
    model = session.scalar(
        select(UploadedModel)
        .where(UploadedModel.id == teacher.id, UploadedModel.tenant_id == tenant_id)
        .with_for_update(read=True)
    )
    if model is None:
        raise SpecInvalid(f"teacher.id: no model {teacher.id!r}; upload one with POST /v1/models")
    if spec.distill.feature is not None and model.format == "onnx":
        raise SpecInvalid("distill.feature: an ONNX teacher does not expose inner layers")
    if spec.compresses_teacher and model.format != "safetensors":
        kind = "an ONNX" if model.format == "onnx" else "a TorchScript"
        try:
            check_opaque_teacher(spec, kind, "teacher.id")
        except ValueError as e:
            raise SpecInvalid(str(e)) from None
    if shape is not None:
        in_shape, classes = shape
        if model.input_shape is not None and tuple(model.input_shape) != in_shape:
            raise SpecInvalid(
                f"teacher.id: model {model.id} takes input {model.input_shape}; the dataset gives {list(in_shape)}"
            )
        if model.num_classes is not None and model.num_classes != classes:
            raise SpecInvalid(
                f"teacher.id: model {model.id} predicts {model.num_classes} classes; the dataset has {classes}"
            )
    if model.format == "safetensors" and model.arch:
        kwargs_field = f"teacher.id: model {model.id}'s arch_kwargs"
        from worker.pipeline.preflight import ArchRef

        return ArchRef("teacher.id", model.arch, model.arch_kwargs or {}, kwargs_field)
    return None


def _check_inits(
    session: Session,
    tenant_id: str,
    spec: JobSpec,
    shape: tuple[tuple[int, ...], int] | None,
    storage: Storage,
) -> None:
    """Each uploaded set of starting weights: the tenant's, safetensors, for the same arch,
    and (from its header alone, read from the store) fitting the model the job builds."""
    from worker.pipeline import preflight

    for ref in preflight.inits_of(spec):
        assert isinstance(ref.init, UploadedInit)  # paths were refused above
        row = session.scalar(
            select(UploadedModel)
            .where(UploadedModel.id == ref.init.id, UploadedModel.tenant_id == tenant_id)
            .with_for_update(read=True)
        )
        where = f"{ref.field}.id: model {ref.init.id!r}"
        if row is None:
            raise SpecInvalid(f"{where} does not exist; upload one with POST /v1/models")
        if row.format != "safetensors":
            raise SpecInvalid(
                f"{where} is {row.format}; starting weights are safetensors (uploaded with their arch)"
            )
        if row.arch != ref.model.arch:
            raise SpecInvalid(
                f"{where} holds weights for arch {row.arch!r}; {ref.model.field} is {ref.model.arch!r}"
            )
        if shape is not None:
            preflight.check_init(ref, _stored_header(storage, row, where), *shape)


def _stored_header(storage: Storage, row: UploadedModel, where: str) -> dict:
    """A stored safetensors upload's header: two range reads, never the tensors."""
    from worker.pipeline.errors import ModelLoadError
    from worker.pipeline.init_weights import parse_header

    def read(start: int, length: int) -> bytes:
        return b"".join(storage.stream(row.path, start, start + length - 1))

    try:
        return parse_header(read, row.filename)
    except ModelLoadError as e:
        raise SpecInvalid(f"{where}: {e.message}") from None


# --- create / read / list / cancel -----------------------------------------------------------


def request_hash(spec: JobSpec) -> str:
    return hashlib.sha256(
        json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()


def _existing_for_key(
    session: Session, tenant_id: str, key: str, digest: str, ttl: float
) -> Job | None:
    """The live job an Idempotency-Key names, or None. A key older than `ttl` seconds is
    released (its job keeps existing, without the key), so the unique (tenant, key) lets a
    new job take it; two requests releasing it at once both succeed, and insert_if_absent
    lets one of them make the job."""
    job = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))
    if job is not None and job.created_at < utcnow() - timedelta(seconds=ttl):
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.idempotency_key == key)
            .values(idempotency_key=None)
            .execution_options(synchronize_session=False)
        )
        return None
    if job is not None and job.request_hash != digest:
        raise IdempotencyConflict(
            f"Idempotency-Key {key!r} was used for a different request (job {job.id}); use a new key"
        )
    return job


def create_job(
    session: Session,
    *,
    tenant_id: str,
    spec: JobSpec,
    idempotency_key: str | None,
    settings: Settings,
    enqueue: Enqueue,
    storage: Storage | None = None,
) -> tuple[Job, bool]:
    """Store a job and enqueue it after commit; returns (job, created). With an idempotency
    key, the same key and body return the first job, even when the requests race."""
    from worker.pipeline.stages import stage_names

    digest, ttl = request_hash(spec), settings.IDEMPOTENCY_TTL_SECONDS
    if idempotency_key is not None:
        existing = _existing_for_key(session, tenant_id, idempotency_key, digest, ttl)
        if existing is not None:
            return existing, False
    check_quotas(session, tenant_id=tenant_id, settings=settings)
    resolved = validate_for_service(
        session, tenant_id=tenant_id, spec=spec, settings=settings, storage=storage
    )
    job = lifecycle.create(
        session,
        tenant_id=tenant_id,
        name=resolved.name,
        spec=resolved.model_dump(mode="json"),
        queue=resolved.queue or settings.DEFAULT_QUEUE,
        stages=stage_names(resolved),
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    if job is None:  # a concurrent request with the same key made it first
        assert idempotency_key is not None
        existing = _existing_for_key(session, tenant_id, idempotency_key, digest, ttl)
        assert existing is not None
        return existing, False
    send_job(session, job_id=job.id, queue=job.queue, enqueue=enqueue)
    return job, True


WAITING = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)


def check_quotas(session: Session, *, tenant_id: str, settings: Settings) -> None:
    """429 when the tenant has TENANT_MAX_ACTIVE_JOBS jobs queued or running, or submitted
    TENANT_MAX_SUBMISSIONS_PER_MINUTE in the last minute. Each count reads at most `limit`
    index entries, however many jobs the tenant has. (Search branches are the search's.)"""
    mine = select(Job).where(Job.tenant_id == tenant_id, Job.parent_id.is_(None))
    active = settings.TENANT_MAX_ACTIVE_JOBS
    if active:
        ids = mine.where(Job.status.in_(WAITING)).with_only_columns(Job.seq).limit(active)
        if session.scalar(select(func.count()).select_from(ids.subquery())) >= active:
            raise QuotaExceeded(
                f"this tenant has {active} jobs queued or running, its limit "
                "(TENANT_MAX_ACTIVE_JOBS); submit more when some have finished",
                headers={"Retry-After": "30"},
            )
    rate = settings.TENANT_MAX_SUBMISSIONS_PER_MINUTE
    if rate:
        latest = mine.with_only_columns(Job.created_at).order_by(Job.seq.desc()).limit(rate)
        times = list(session.scalars(latest))
        window = utcnow() - timedelta(minutes=1)
        if len(times) >= rate and times[-1] > window:
            wait = max(1, math.ceil((times[-1] - window).total_seconds()))
            raise QuotaExceeded(
                f"this tenant submitted {rate} jobs in the last minute, its limit "
                f"(TENANT_MAX_SUBMISSIONS_PER_MINUTE); retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    return job


def list_jobs(
    session: Session, *, tenant_id: str, status: str | None, limit: int, after: str | None
) -> tuple[list[Job], bool]:
    """Newest first, `limit` per page; `after` is the id of the last job of the previous page.
    Keyset pagination on (tenant_id, seq): each page is an index range scan, never an OFFSET."""
    # A search's branches are jobs of their own, shown on the search, not in the list.
    query = select(Job).where(Job.tenant_id == tenant_id, Job.parent_id.is_(None))
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        cursor = session.scalar(select(Job.seq).where(Job.id == after, Job.tenant_id == tenant_id))
        if cursor is None:
            raise JobNotFound(f"no job {after!r} to page after")
        query = query.where(Job.seq < cursor)
    rows = list(session.scalars(query.order_by(Job.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def stages_of(session: Session, *, job_ids: list[str]) -> dict[str, list[JobStage]]:
    out: dict[str, list[JobStage]] = {j: [] for j in job_ids}
    if job_ids:
        rows = session.scalars(
            select(JobStage).where(JobStage.job_id.in_(job_ids)).order_by(JobStage.position)
        )
        for row in rows:
            out[row.job_id].append(row)
    return out


def publish(session: Session, jobs: list[Job]) -> list[JobPublic]:
    """Jobs as the API shows them, with their stages (and a search's branches), in two or
    three queries for the whole page."""
    ids = [j.id for j in jobs]
    stages = stages_of(session, job_ids=ids)
    branches: dict[str, list[Job]] = {i: [] for i in ids}
    searches = [j.id for j in jobs if (j.spec or {}).get("search") and j.parent_id is None]
    if searches:
        for row in session.scalars(
            select(Job).where(Job.parent_id.in_(searches)).order_by(Job.branch)
        ):
            branches[row.parent_id].append(row)  # type: ignore[index]
    return [to_public(j, stages[j.id], branches[j.id]) for j in jobs]


def _search_progress(job: Job, branches: list[Job]) -> float:
    """While its branches run, a search's progress is theirs: teacher first (the job's own
    progress up to 0.2), then the branches' mean over 0.2..0.95, then the export."""
    if job.stage != "search" or not branches or job.status not in ACTIVE:
        return job.progress
    done = [1.0 if b.status in TERMINAL else b.progress for b in branches]
    return 0.2 + 0.75 * sum(done) / len(done)


def _candidates_total(job: Job) -> int | None:
    if not (job.spec or {}).get("search") or job.parent_id is not None:
        return None
    from worker.pipeline.search import plan

    return plan(JobSpec.model_validate(job.spec)).size


def to_public(job: Job, stages: list[JobStage], branches: list[Job] | None = None) -> JobPublic:
    error = (
        ErrorPublic(code=job.error_code, message=job.error_message or "")
        if job.error_code
        else None
    )
    branches = branches or []
    return JobPublic(
        id=job.id,
        name=job.name,
        status=job.status,  # type: ignore[arg-type]
        stage=job.stage,
        progress=_search_progress(job, branches),
        stages=[StagePublic.model_validate(s) for s in stages],
        metrics=job.metrics or {},
        gates=job.gates or [],
        gates_passed=None if job.gates is None else all(g["passed"] for g in job.gates),
        error=error,
        spec=job.spec,
        queue=job.queue,
        attempts=job.attempts,
        parent_id=job.parent_id,
        branch=job.branch,
        candidates_total=_candidates_total(job),
        branches=[
            BranchPublic(
                id=b.id,
                branch=b.branch or 0,
                status=b.status,  # type: ignore[arg-type]
                progress=b.progress,
                attempts=b.attempts,
                error=ErrorPublic(code=b.error_code, message=b.error_message or "")
                if b.error_code
                else None,
            )
            for b in branches
        ],
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        artifacts_expired_at=job.artifacts_expired_at,
    )


def candidates_of(session: Session, *, tenant_id: str, job_id: str) -> list[JobCandidate]:
    """A search's candidates so far (all of them, with the front and the choice, once it
    ended); empty for a plain job."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    return list(
        session.scalars(
            select(JobCandidate).where(JobCandidate.job_id == job_id).order_by(JobCandidate.key)
        )
    )


def cancel_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """Queued jobs are cancelled at once; running ones stop at the next batch boundary."""
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id).with_for_update()
    )
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    if not lifecycle.cancel(session, job=job):
        raise JobStateConflict(f"job {job_id} already {job.status}")
    return job


def delete_job(session: Session, *, tenant_id: str, job_id: str, storage: Storage) -> None:
    """Delete a finished job with everything recorded about it (stages, events, history,
    artifacts, a search's branches) and, once that has committed, its files. 409 while it is
    queued or running: cancel it first."""
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id).with_for_update()
    )
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    if job.status not in TERMINAL:
        raise JobStateConflict(f"job {job_id} is {job.status}; cancel it, or wait for it to end")
    branches = list(session.scalars(select(Job.id).where(Job.parent_id == job_id)))
    session.execute(delete(Job).where(Job.parent_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))
    remove_after_commit(session, storage, [job_key(j) for j in (job_id, *branches)])


def events_after(
    session: Session, *, job_id: str, after_id: int, limit: int = 500
) -> list[JobEvent]:
    return list(
        session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
            .order_by(JobEvent.id)
            .limit(limit)
        )
    )


def events_of_jobs(
    session: Session, *, cursors: dict[str, int], limit: int = 5000
) -> list[JobEvent]:
    """New events of several jobs at once, each after its own cursor, oldest first: one query
    for every stream an API process holds. A job's events are written by one worker at a
    time, in order, so per-job cursors never skip a row that commits late."""
    if not cursors:
        return []
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id.in_(list(cursors)), JobEvent.id > min(cursors.values()))
        .order_by(JobEvent.id)
        .limit(limit)
    )
    return [ev for ev in rows if ev.id > cursors[ev.job_id]]


def job_status(session: Session, *, job_id: str) -> str | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


def owned_job_status(session: Session, *, tenant_id: str, job_id: str) -> str:
    """The status of the tenant's job (404 for another's), without loading the job's row."""
    status = session.scalar(select(Job.status).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if status is None:
        raise JobNotFound(f"no job {job_id!r}")
    return status


def _unexpired_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    """The job, or 410 once retention deleted its files: a clear answer, not a 404 that
    reads as if the job never made them."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.artifacts_expired_at is not None:
        raise ArtifactsExpired(
            f"the artifacts of job {job_id} were deleted on "
            f"{job.artifacts_expired_at:%Y-%m-%d} (retention); its record and metrics remain"
        )
    return job


def list_artifacts(session: Session, *, tenant_id: str, job_id: str) -> list[Artifact]:
    _unexpired_job(session, tenant_id=tenant_id, job_id=job_id)
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id))
    )


def get_artifact(session: Session, *, tenant_id: str, job_id: str, name: str) -> Artifact:
    _unexpired_job(session, tenant_id=tenant_id, job_id=job_id)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    )
    if artifact is None:
        raise ArtifactNotFound(f"job {job_id} has no artifact {name!r}")
    return artifact


def get_final_artifact(session: Session, *, tenant_id: str, job_id: str) -> Artifact:
    """The file of the job's final model (`final` in its listing)."""
    _unexpired_job(session, tenant_id=tenant_id, job_id=job_id)
    artifact = session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.final.is_(True))
    )
    if artifact is None:
        raise ArtifactNotFound(f"job {job_id} has no final model (it has not succeeded)")
    return artifact


def history_of(session: Session, *, tenant_id: str, job_id: str) -> list[JobHistory]:
    """Every recorded epoch of the job's training runs, in the order they ran; a search's
    include its branches' (their run names say which student and candidate)."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    jobs = select(Job.id).where((Job.id == job_id) | (Job.parent_id == job_id))
    return list(
        session.scalars(
            select(JobHistory).where(JobHistory.job_id.in_(jobs)).order_by(JobHistory.id)
        )
    )


def counts_by_status(session: Session) -> dict[str, int]:
    from sqlalchemy import func

    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())  # type: ignore[arg-type]


def stage_durations(session: Session, *, buckets: list[float]) -> dict[str, dict[str, Any]]:
    """Per stage: count, sum and cumulative bucket counts of finished stage durations."""
    from sqlalchemy import case, func

    cols = [func.sum(case((JobStage.seconds <= b, 1), else_=0)) for b in buckets]
    rows = session.execute(
        select(JobStage.name, func.count(), func.sum(JobStage.seconds), *cols)
        .where(JobStage.status == StageStatus.SUCCEEDED, JobStage.seconds.is_not(None))
        .group_by(JobStage.name)
    ).all()
    return {
        r[0]: {
            "count": int(r[1]),
            "sum": float(r[2] or 0.0),
            "buckets": [int(v or 0) for v in r[3:]],
        }
        for r in rows
    }
