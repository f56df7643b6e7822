"""Celery tasks: thin and idempotent. A task gets a job id, claims the row, runs the pipeline
with checkpoints under the job's folder, and records what happened. State lives in the DB."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from app.core.config import settings
from app.core.db import Database
from app.core.reaper import Reaper
from app.core.storage import Storage
from app.models import Dataset, Model
from app.services import runs
from worker.celery_app import RUN_JOB, celery_app, enqueue, queue_size
from worker.pipeline.errors import Cancelled, PipelineError
from worker.pipeline.export import sha256_file
from worker.pipeline.spec import (
    DatasetCommon,
    ImageFolderDataset,
    JobSpec,
    NpzDataset,
    OnnxTeacher,
    SafetensorsTeacher,
    TorchScriptTeacher,
    UploadedDataset,
    UploadedTeacher,
)

log = logging.getLogger("distillery.worker")

_db: Database | None = None


def db() -> Database:
    global _db
    if _db is None:
        _db = Database(settings.database_url)
    return _db


def storage() -> Storage:
    return Storage(settings.storage_dir)


class Heartbeat(threading.Thread):
    """Beats for the job while it runs; notices cancel requests and lost ownership."""

    def __init__(self, job_id: str, worker_id: str) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.job_id, self.worker_id = job_id, worker_id
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()

    def beat(self) -> None:
        try:
            with db().session() as s:
                owned, cancel = runs.heartbeat(s, job_id=self.job_id, worker_id=self.worker_id)
        except Exception:  # the DB blinked: try again next beat; the timeout is generous
            log.warning("heartbeat for %s failed", self.job_id, exc_info=True)
            return
        if not owned:
            self.lost.set()
        if cancel:
            self.cancel.set()

    def run(self) -> None:
        while not self._stop.wait(settings.HEARTBEAT_SECONDS):
            self.beat()

    def stop(self) -> None:
        self._stop.set()


class Recorder:
    """Turns pipeline events into job rows and job events; progress is throttled, the
    training history never is."""

    def __init__(self, job_id: str, worker_id: str, heartbeat: Heartbeat) -> None:
        self.job_id, self.worker_id, self.hb = job_id, worker_id, heartbeat
        self._last_progress = 0.0
        self._last_stage = ""
        self._history: list[dict[str, Any]] = []  # rows not stored yet

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e["type"]
        if kind in ("history", "done"):
            if kind == "history":
                self._history.append(e["row"])
            self._store_history()
            return
        now = time.monotonic()
        if kind == "progress":
            final = e.get("stage_progress", 0.0) >= 1.0
            if (
                not final
                and e["stage"] == self._last_stage
                and now - self._last_progress < settings.PROGRESS_THROTTLE_SECONDS
            ):
                return
            self._last_progress, self._last_stage = now, e["stage"]
        try:
            with db().session() as s:
                self._write(s, kind, e)
        except Exception:  # a lost progress line is not worth failing a job for
            log.warning("could not record %s event for %s", kind, self.job_id, exc_info=True)

    def _store_history(self) -> None:
        """Store the pending rows; rows a database blip held back go with the next row (or at
        the end of the job) instead of being lost."""
        if not self._history:
            return
        try:
            with db().session() as s:
                rows, job_id, worker_id = self._history, self.job_id, self.worker_id
                if not runs.record_history(s, job_id=job_id, worker_id=worker_id, rows=rows):
                    self.hb.lost.set()
            self._history = []
        except Exception:
            log.warning("could not record history for %s; retrying", self.job_id, exc_info=True)

    def _write(self, s, kind: str, e: dict[str, Any]) -> None:
        job_id, worker_id = self.job_id, self.worker_id
        if kind == "progress":
            if not runs.set_progress(
                s, job_id=job_id, worker_id=worker_id, stage=e["stage"], progress=e["progress"]
            ):
                self.hb.lost.set()
                return
            data = {"stage": e["stage"], "progress": round(e["progress"], 4)}
            if e.get("message"):
                data["message"] = e["message"]
            runs.add_event(s, job_id=job_id, type="progress", data=data)
        elif kind == "stage":
            status = e["status"]
            runs.set_stage(
                s,
                job_id=job_id,
                worker_id=worker_id,
                name=e["stage"],
                status=status,
                seconds=e.get("seconds"),
                metrics=e.get("metrics")
                if status == "succeeded" and not e.get("resumed")
                else None,
            )
            runs.add_event(
                s, job_id=job_id, type="stage", data={k: v for k, v in e.items() if k != "type"}
            )
        elif kind == "metrics":
            runs.set_model_metrics(
                s, job_id=job_id, worker_id=worker_id, model=e["model"], metrics=e["metrics"]
            )
            runs.add_event(
                s,
                job_id=job_id,
                type="metrics",
                data={"model": e["model"], "metrics": e["metrics"]},
            )
        elif kind == "log":
            runs.add_event(
                s,
                job_id=job_id,
                type="log",
                data={"stage": e.get("stage"), "message": e["message"]},
            )


def resolve_uploads(spec: JobSpec, tenant_id: str) -> JobSpec:
    """Turn upload ids into file specs the pipeline reads (only a worker opens user models)."""
    store = storage()
    updates: dict[str, Any] = {}
    with db().session() as s:
        ds = spec.dataset
        if isinstance(ds, UploadedDataset):
            row = s.get(Dataset, ds.id)
            if row is None or row.tenant_id != tenant_id:
                raise PipelineError(f"dataset {ds.id} no longer exists")
            # Every split setting carries over (val_fraction was once dropped here).
            common = {
                **{k: getattr(ds, k) for k in DatasetCommon.model_fields},
                "path": str(store.resolve(row.path)),
            }
            updates["dataset"] = (
                NpzDataset(source="npz", **common)
                if row.kind == "npz"
                else ImageFolderDataset(
                    source="imagefolder", image_size=ds.image_size, grayscale=ds.grayscale, **common
                )
            )
        teacher = spec.teacher
        if isinstance(teacher, UploadedTeacher):
            row = s.get(Model, teacher.id)
            if row is None or row.tenant_id != tenant_id:
                raise PipelineError(f"model {teacher.id} no longer exists")
            path = str(store.resolve(row.path))
            if row.format == "torchscript":
                updates["teacher"] = TorchScriptTeacher(source="torchscript", path=path)
            elif row.format == "onnx":
                updates["teacher"] = OnnxTeacher(source="onnx", path=path)
            else:
                updates["teacher"] = SafetensorsTeacher(
                    source="safetensors", path=path, arch=row.arch, arch_kwargs=row.arch_kwargs
                )
    return spec.model_copy(update=updates) if updates else spec


def worker_process() -> str:
    """This worker process's name in the `workers` table: what its supervisor (`serve`) knows
    it by, from the outside, to release its jobs when it dies."""
    return runs.worker_name(socket.gethostname(), os.getpid())


def worker_identity() -> str:
    """Who runs one attempt of a job: the process, then a fresh token (every write of the
    attempt is fenced on it, so a stale attempt can change nothing)."""
    return f"{worker_process()}/{uuid.uuid4().hex[:8]}"


def execute(job_id: str) -> str:
    """Run one job to a terminal state (or leave it to its current owner). Returns what happened."""
    from worker.pipeline.runner import ARTIFACT_FORMATS, run_job

    worker_id = worker_identity()
    stale_before = runs.utcnow() - timedelta(seconds=settings.HEARTBEAT_TIMEOUT_SECONDS)
    with db().session() as s:
        job = runs.claim(
            s,
            job_id=job_id,
            worker_id=worker_id,
            stale_before=stale_before,
            max_attempts=settings.MAX_ATTEMPTS,
        )
        if job is None:
            runs.mark_cancelled_if_requested(s, job_id=job_id)
            return "skipped"
        spec_json, tenant_id, started = job.spec, job.tenant_id, job.started_at
    hb = Heartbeat(job_id, worker_id)
    hb.start()
    deadline = (
        time.time() + settings.JOB_TIMEOUT_SECONDS - (runs.utcnow() - started).total_seconds()
    )
    recorder = Recorder(job_id, worker_id, hb)
    out_dir = storage().job_dir(job_id)

    def should_cancel() -> bool:
        return hb.cancel.is_set() or hb.lost.is_set() or time.time() > deadline

    status, error, report = "failed", None, None
    try:
        public = JobSpec.model_validate(spec_json)
        spec = resolve_uploads(public, tenant_id)
        report = run_job(
            spec, out_dir, on_event=recorder, should_cancel=should_cancel, public_spec=spec_json
        )
        status = "succeeded"
    except Cancelled as e:
        if hb.lost.is_set():
            log.warning("job %s was taken over elsewhere; leaving it", job_id)
            return "lost"
        if time.time() > deadline:
            error = (
                "timeout",
                f"the job ran past JOB_TIMEOUT_SECONDS={settings.JOB_TIMEOUT_SECONDS:.0f}",
            )
        else:
            status, error = "cancelled", ("cancelled", e.message)
    except PipelineError as e:
        error = (e.code, e.message)
    except Exception as e:  # a bug: the job fails with a message, the trace goes to the log
        log.exception("job %s crashed", job_id)
        error = ("internal_error", f"{type(e).__name__}: {e}")
    finally:
        hb.stop()

    artifacts = None
    if report is not None:
        store = storage()
        names = [a["name"] for a in report["artifacts"]] + ["report.json"]
        artifacts = [
            {
                "name": name,
                "format": ARTIFACT_FORMATS.get(name, "json"),
                "bytes": (out_dir / name).stat().st_size,
                "sha256": sha256_file(out_dir / name),
                "path": store.relative(out_dir / name),
            }
            for name in names
        ]

    def record() -> bool:
        with db().session() as s:
            return runs.finish(
                s,
                job_id=job_id,
                worker_id=worker_id,
                status=status,
                metrics=report["metrics"] if report else None,
                gates=report["gates"] if report else None,
                artifacts=artifacts,
                error=error,
                stages=report["stages"] if report else None,
            )

    done = retry_db(record, what=f"recording the end of {job_id}")
    return status if done else "lost"


def retry_db(fn, *, what: str, attempts: int = 30, delay: float = 2.0):
    """Run a DB write, riding out a database that is briefly unreachable: the work it records
    took minutes to hours and must not be lost to a blip."""
    from sqlalchemy.exc import DBAPIError

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except DBAPIError:
            if attempt == attempts:
                raise
            log.warning("database unavailable while %s; retry %d/%d", what, attempt, attempts - 1)
            time.sleep(delay)
    return None


@celery_app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job_task(job_id: str) -> str:
    return execute(job_id)


# --- presence and reaper ---------------------------------------------------------------------


class Presence(threading.Thread):
    """Keeps this process in the `workers` table while it runs (readiness counts live workers
    per queue); re-registers if someone removed the row while the database was unreachable."""

    def __init__(self, queues: list[str]) -> None:
        super().__init__(daemon=True, name="presence")
        self.queues = queues
        self._stop = threading.Event()

    def register(self) -> None:
        with db().session() as s:
            runs.register_worker(
                s,
                worker=worker_process(),
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=self.queues,
            )

    def run(self) -> None:
        while not self._stop.wait(settings.HEARTBEAT_SECONDS):
            try:
                with db().session() as s:
                    known = runs.worker_heartbeat(s, worker=worker_process())
                if not known:
                    self.register()
            except Exception:  # the DB blinked: the next beat tries again
                log.warning("worker heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        try:
            with db().session() as s:
                runs.forget_worker(s, worker=worker_process())
        except Exception:
            log.warning("could not deregister this worker", exc_info=True)


_reaper: Reaper | None = None
_presence: Presence | None = None


def _consumed_queues(consumer: Any) -> list[str]:
    try:
        return sorted(q.name for q in consumer.task_consumer.queues)
    except AttributeError:  # no consumer object: the configured default
        return [settings.DEFAULT_QUEUE]


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    global _reaper, _presence
    storage().ensure()
    _presence = Presence(_consumed_queues(sender))
    _presence.register()
    _presence.start()
    _reaper = Reaper(db(), settings, enqueue, queue_size)
    _reaper.start()


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()
    if _presence is not None:
        _presence.stop()
