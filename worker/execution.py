"""Running one claimed job: the claim, the work under a heartbeat, and the record of what
happened. The Celery task (worker/tasks.py) and the search's phases (worker/searches.py)
both run their work through here."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from app.core.storage import StorageError
from app.jobs import lifecycle
from app.jobs.states import JobStatus
from app.models import utcnow
from distillery_contract.errors import ErrorCode
from worker.jobfolder import JobFolder
from worker.pipeline.errors import Cancelled, PipelineError
from worker.pipeline.files import sha256_file
from worker.pipeline.history import log_path, read_rows
from worker.pipeline.spec import JobSpec
from worker.presence import JobHeartbeat, attempt_id
from worker.recorder import Recorder
from worker.runtime import Runtime, retry_db
from worker.uploads import resolve_uploads

log = logging.getLogger("distillery.worker")


@dataclass
class Claimed:
    worker_id: str
    spec: dict[str, Any]
    tenant_id: str
    deadline: float  # time.time() past which the job times out
    parent_id: str | None = None  # a search's branch: the search
    branch: int | None = None
    status: JobStatus = (
        JobStatus.RUNNING
    )  # cancelling: a search ended while its branches were stopped


@dataclass
class Outcome:
    status: JobStatus
    error: tuple[ErrorCode, str] | None = None
    report: dict[str, Any] | None = None


Work = Callable[[Callable[[], bool], Recorder], dict[str, Any]]


def pipeline_work(runtime: Runtime, claimed: Claimed, folder: JobFolder) -> Work:
    from worker.pipeline.runner import run_pipeline

    def work(should_cancel: Callable[[], bool], recorder: Recorder) -> dict[str, Any]:
        folder.pull(".work")  # what an earlier attempt, maybe on another host, checkpointed
        spec = resolve_uploads(runtime, JobSpec.model_validate(claimed.spec), claimed.tenant_id)
        report = run_pipeline(
            spec,
            folder.path,
            on_event=folder.watching(recorder),
            should_cancel=should_cancel,
            public_spec=claimed.spec,
            limits=runtime.settings.spec_limits(),
            data_settings=runtime.settings.data_settings(),
        )
        folder.publish(artifact_names(report))
        return report

    return work


def artifact_names(report: dict[str, Any]) -> list[str]:
    return [*(a["name"] for a in report["artifacts"]), "report.json"]


def run_work(
    runtime: Runtime,
    job_id: str,
    claimed: Claimed,
    work: Work,
    folder: JobFolder,
    recorder: Recorder | None = None,
) -> str:
    """Run `work` under the job's heartbeat and record how it ended."""
    outcome = heartbeating(runtime, job_id, claimed, work, recorder)
    if outcome is None:
        return "lost"
    done = retry_db(
        lambda: record_outcome(runtime, job_id, claimed.worker_id, outcome, folder),
        what=f"recording the end of {job_id}",
    )
    folder.discard()
    return outcome.status.value if done else "lost"


def heartbeating(
    runtime: Runtime, job_id: str, claimed: Claimed, work: Work, recorder: Recorder | None = None
) -> Outcome | None:
    hb = JobHeartbeat(runtime, job_id, claimed.worker_id)
    hb.start()
    try:
        recorder = recorder or Recorder(runtime, job_id, claimed.worker_id, hb)
        recorder.hb = hb
        return _guarded(runtime, job_id, claimed, hb, work, recorder)
    finally:
        hb.stop()


def claim(runtime: Runtime, job_id: str) -> Claimed | None:
    s = runtime.settings
    worker_id = attempt_id()
    stale_before = utcnow() - timedelta(seconds=s.HEARTBEAT_TIMEOUT_SECONDS)
    with runtime.db.session() as session:
        job = lifecycle.claim(
            session,
            job_id=job_id,
            worker_id=worker_id,
            stale_before=stale_before,
            max_attempts=s.MAX_ATTEMPTS,
        )
        return None if job is None else claimed_of(runtime, job, worker_id)


def claimed_of(runtime: Runtime, job: Any, worker_id: str) -> Claimed:
    ran_for = (utcnow() - (job.started_at or utcnow())).total_seconds()
    deadline = time.time() + runtime.settings.JOB_TIMEOUT_SECONDS - ran_for
    return Claimed(
        worker_id, job.spec, job.tenant_id, deadline, job.parent_id, job.branch, job.status
    )


def _guarded(
    runtime: Runtime,
    job_id: str,
    claimed: Claimed,
    hb: JobHeartbeat,
    work: Work,
    recorder: Recorder,
) -> Outcome | None:
    """`work`, with cancel, lost ownership and the timeout checked between batches; its
    failure becomes the job's error. None when another attempt took the job over (it is
    theirs to record)."""

    def should_cancel() -> bool:
        return hb.cancel.is_set() or hb.lost.is_set() or time.time() > claimed.deadline

    try:
        return Outcome(JobStatus.SUCCEEDED, report=work(should_cancel, recorder))
    except Cancelled as e:
        if hb.lost.is_set():
            log.warning("job %s was taken over elsewhere; leaving it", job_id)
            return None
        if time.time() > claimed.deadline:
            limit = runtime.settings.JOB_TIMEOUT_SECONDS
            return Outcome(
                JobStatus.FAILED,
                (ErrorCode.TIMEOUT, f"the job ran past JOB_TIMEOUT_SECONDS={limit:.0f}"),
            )
        return Outcome(JobStatus.CANCELLED, (ErrorCode.CANCELLED, e.message))
    except PipelineError as e:
        return Outcome(JobStatus.FAILED, (e.code, e.message))
    except StorageError as e:  # boto3 retried already; the job's files are not safe to use
        log.warning("job %s: %s", job_id, e)
        return Outcome(JobStatus.FAILED, (ErrorCode.STORAGE_ERROR, str(e)))
    except Exception as e:  # a bug: the job fails with a message, the trace goes to the log
        log.exception("job %s crashed", job_id)
        return Outcome(JobStatus.FAILED, (ErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}"))


def record_outcome(
    runtime: Runtime, job_id: str, worker_id: str, outcome: Outcome, folder: JobFolder | None
) -> bool:
    """`folder`: the job's, with its report and training log (None: a branch, whose rows
    went to its search, or a search that ends with no work of its own left)."""
    artifacts = None
    if folder is not None and outcome.report is not None and "artifacts" in outcome.report:
        out = folder.path
        # The report lists (and hashed) every artifact once; only report.json is new here.
        report_json = {
            "name": "report.json",
            "format": "json",
            "bytes": (out / "report.json").stat().st_size,
            "sha256": sha256_file(out / "report.json"),
        }
        artifacts = [
            {**a, "path": f"{folder.key}/{a['name']}"}
            for a in [*outcome.report["artifacts"], report_json]
        ]
    # The pipeline's own log of every epoch: rows the recorder could not write (a database
    # outage) are not lost.
    history = read_rows(log_path(folder.path)) if folder is not None else []
    with runtime.db.session() as s:
        return lifecycle.finish(
            s,
            job_id=job_id,
            worker_id=worker_id,
            status=outcome.status,
            report=outcome.report,
            artifacts=artifacts,
            error=outcome.error,
            history=history or None,
        )


# --- the worker process: presence and reaper threads -------------------------------------------
