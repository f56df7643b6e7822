"""The Celery task: thin and idempotent. It gets a job id, claims the row, runs the pipeline
with checkpoints under the job's folder, and records what happened. State lives in the DB."""

from __future__ import annotations

from typing import Any

from celery import Celery, current_app, shared_task
from celery.signals import worker_ready, worker_shutting_down

from app.jobs.reaper import Reaper
from app.services.retention import Retention
from worker import searches
from worker.celery_app import JOB_TASK, make_enqueue, make_queue_size
from worker.execution import claim, pipeline_work, run_work
from worker.presence import Presence
from worker.runtime import Runtime, runtime_of


@shared_task(bind=True, name=JOB_TASK, acks_late=True, reject_on_worker_lost=True)
def job_task(self: Any, job_id: str) -> str:
    return execute_job(runtime_of(self.app), job_id, celery=self.app)


def execute_job(runtime: Runtime, job_id: str, *, celery: Celery | None = None) -> str:
    """Run one job to a terminal state (or leave it to its current owner). Returns what
    happened: the job's status, `skipped` (nothing to claim), `lost` (taken over) or, for a
    search whose branches were sent out, `waiting`.

    A search runs as three tasks on the same message: the teacher (then its branches are sent
    as child jobs), each branch (a child job), and, once every branch has ended, the choice."""
    claimed = claim(runtime, job_id)
    if claimed is None:
        claimed = searches.claim_finish(runtime, job_id)
        if claimed is None:
            return "skipped"
        return searches.finish(runtime, job_id, claimed)
    if claimed.parent_id is not None:
        return searches.branch(runtime, job_id, claimed, celery)
    if claimed.spec.get("search") is not None:
        return searches.start(runtime, job_id, claimed, celery)
    folder = runtime.job_folder(job_id)
    return run_work(runtime, job_id, claimed, pipeline_work(runtime, claimed, folder), folder)


def _consumed_queues(consumer: Any, default: str) -> list[str]:
    try:
        return sorted(q.name for q in consumer.task_consumer.queues)
    except AttributeError:  # no consumer object: the configured default
        return [default]


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None) or current_app
    runtime = runtime_of(app)
    runtime.storage.ensure()
    presence = Presence(runtime, _consumed_queues(sender, runtime.settings.DEFAULT_QUEUE))
    presence.register()
    presence.start()
    reaper = Reaper(
        runtime.db,
        runtime.settings,
        make_enqueue(app),
        make_queue_size(app),
        chores=[Retention(runtime.db, runtime.settings, runtime.storage)],
    )
    reaper.start()
    app.distillery_threads = [presence, reaper]


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    for thread in getattr(current_app, "distillery_threads", []):
        thread.stop()
