"""Search jobs on the service: one message, three kinds of task.

1. `start`: the search's own first task trains (or loads) the teacher once, then makes one
   child job per student (a branch) and sends them out together as a Celery group, routed to
   the search's queue; the search then waits with no worker holding it.
2. `branch`: a child job runs one branch (worker.pipeline.branch) on whichever worker takes
   it, reading the teacher from the search's folder and writing its candidates there; each
   candidate is listed on the search as soon as it is measured. A lost worker costs only its
   branch (re-queued and resumed like any job); the last branch to end sends the search's
   message again.
3. `finish`: the search, all branches ended, chooses among the candidates on record and
   exports (or, if it was cancelled meanwhile, ends cancelled).

The join is counted in the database, not with a Celery chord: a chord needs a result
backend, and the job's state lives in the database (a lost message is sent again by the
reaper, which finds searches whose branches all ended).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, group

from app.jobs import lifecycle, search
from app.jobs.states import JobStatus, StageStatus
from distillery_contract.errors import ErrorCode
from worker.celery_app import JOB_TASK, make_celery, make_enqueue
from worker.execution import (
    Claimed,
    Outcome,
    artifact_names,
    claimed_of,
    heartbeating,
    record_outcome,
    run_work,
)
from worker.pipeline.spec import JobSpec
from worker.recorder import Recorder
from worker.runtime import Runtime, retry_db
from worker.uploads import resolve_uploads

# Where each phase sits in the search's progress, 0..1.
SHARE = {"teacher": (0.0, 0.2), "search": (0.2, 0.95), "export": (0.95, 1.0)}


def _spec(runtime: Runtime, claimed: Claimed) -> JobSpec:
    return resolve_uploads(runtime, JobSpec.model_validate(claimed.spec), claimed.tenant_id)


def _app(runtime: Runtime, celery: Celery | None) -> Celery:
    return celery if celery is not None else make_celery(runtime.settings)


def start(runtime: Runtime, job_id: str, claimed: Claimed, celery: Celery | None) -> str:
    """The teacher, then the branches (made once; sent again if a re-run finds them queued)."""
    from worker.pipeline.search import plan

    with runtime.db.session() as s:
        made, ended = search.branches_of(s, job_id), search.branches_ended(s, job_id=job_id)
    if made and ended:  # the finish was lost with its worker: do it now
        return finish(runtime, job_id, claimed)
    if not made:
        ended = _run_teacher(runtime, job_id, claimed)
        if ended is not None:
            return ended
    count = len(plan(JobSpec.model_validate(claimed.spec)).students)
    to_send = retry_db(
        lambda: _wait(runtime, job_id, claimed.worker_id, count), what=f"branching {job_id}"
    )
    if to_send is None:
        return "lost"
    send_branches(runtime, _app(runtime, celery), to_send)
    return "waiting"


def _run_teacher(runtime: Runtime, job_id: str, claimed: Claimed) -> str | None:
    """The search's teacher, shared with its branches under `.work/shared` in its folder.
    None when it is there; else how the search ended."""
    from worker.pipeline.search import run_teacher

    folder = runtime.job_folder(job_id)

    def work(should_cancel, recorder: Recorder) -> dict[str, Any]:
        folder.pull(".work", skip=(".work/branches/",))
        report = run_teacher(
            _spec(runtime, claimed),
            folder.path,
            on_event=folder.watching(recorder),
            should_cancel=should_cancel,
            public_spec=claimed.spec,
            limits=runtime.settings.spec_limits(),
        )
        folder.push()
        return report

    recorder = Recorder(runtime, job_id, claimed.worker_id, None, span=SHARE["teacher"])
    try:
        outcome = heartbeating(runtime, job_id, claimed, work, recorder)
        if outcome is None:
            return "lost"
        if outcome.status != JobStatus.SUCCEEDED:
            record_outcome(runtime, job_id, claimed.worker_id, outcome, folder)
            return outcome.status.value
        return None
    finally:
        folder.discard()


def _wait(runtime: Runtime, job_id: str, worker_id: str, count: int):
    with runtime.db.session() as s:
        return lifecycle.wait_for_branches(s, job_id=job_id, worker_id=worker_id, count=count)


def send_branches(runtime: Runtime, celery: Celery, branches: list[tuple[str, str]]) -> None:
    """One task per branch, sent together and routed to the search's queue. If the broker is
    down they stay unsent, and the reaper sends them."""
    if not branches:
        return
    group(
        celery.signature(JOB_TASK, args=[branch_id], queue=queue, immutable=True)
        for branch_id, queue in branches
    ).apply_async()
    for branch_id, _ in branches:
        lifecycle.mark_enqueued(runtime.db.engine, job_id=branch_id)


def branch(runtime: Runtime, job_id: str, claimed: Claimed, celery: Celery | None) -> str:
    """One branch of a search; the last to end sends the search's message."""
    from worker.pipeline.branch import run_branch

    parent, index = claimed.parent_id, claimed.branch
    assert parent is not None and index is not None
    # The branch's own copy of the search's folder: the teacher, and its own part.
    folder, mine = runtime.job_folder(parent, at=job_id), f".work/branches/{index}"

    def work(should_cancel, recorder: Recorder) -> dict[str, Any]:
        started = time.perf_counter()
        recorder({"type": "stage", "stage": "branch", "status": StageStatus.RUNNING})
        folder.pull(".work/shared")
        folder.pull(mine)
        records = run_branch(
            _spec(runtime, claimed),
            folder.path,
            index,
            on_event=folder.watching(recorder, under=mine),
            should_cancel=should_cancel,
            limits=runtime.settings.spec_limits(),
            public_spec=claimed.spec,
        )
        folder.push(mine)
        seconds = time.perf_counter() - started
        stage = {"name": "branch", "seconds": seconds, "metrics": {"candidates": len(records)}}
        return {"metrics": {"candidates": len(records)}, "gates": [], "stages": [stage]}

    recorder = Recorder(runtime, job_id, claimed.worker_id, None, candidates_for=parent)
    outcome = heartbeating(runtime, job_id, claimed, work, recorder)
    if outcome is None:
        return "lost"
    retry_db(lambda: record_outcome(runtime, job_id, claimed.worker_id, outcome, None), what=job_id)
    folder.discard()
    with runtime.db.session() as s:
        ended = search.branches_ended(s, job_id=parent)
    if ended:
        make_enqueue(_app(runtime, celery))(parent, _queue_of(runtime, parent))
    return outcome.status.value


def _queue_of(runtime: Runtime, job_id: str) -> str:
    from sqlalchemy import select

    from app.models import Job

    with runtime.db.session() as s:
        return s.scalars(select(Job.queue).where(Job.id == job_id)).one()


def claim_finish(runtime: Runtime, job_id: str) -> Claimed | None:
    from worker.presence import attempt_id

    worker_id = attempt_id()
    with runtime.db.session() as s:
        job = search.claim_finish(
            s, job_id=job_id, worker_id=worker_id, progress=SHARE["export"][0]
        )
        return None if job is None else claimed_of(runtime, job, worker_id)


def finish(runtime: Runtime, job_id: str, claimed: Claimed) -> str:
    """Choose among the candidates the branches made, and export; a search cancelled while
    its branches stopped just ends cancelled."""
    from worker.pipeline.finalize import finalize

    if claimed.status == JobStatus.CANCELLING:
        cancelled = Outcome(
            JobStatus.CANCELLED, (ErrorCode.CANCELLED, "cancelled during the search")
        )
        retry_db(
            lambda: record_outcome(runtime, job_id, claimed.worker_id, cancelled, None),
            what=job_id,
        )
        return JobStatus.CANCELLED.value

    folder = runtime.job_folder(job_id)

    def work(should_cancel, recorder: Recorder) -> dict[str, Any]:
        recorder({"type": "stage", "stage": "search", "status": StageStatus.SUCCEEDED})
        recorder({"type": "stage", "stage": "export", "status": StageStatus.RUNNING})
        started = time.perf_counter()
        folder.pull()  # the teacher's record and every branch's candidates
        report = finalize(
            _spec(runtime, claimed),
            folder.path,
            on_event=recorder,
            public_spec=claimed.spec,
        )
        folder.publish(artifact_names(report))
        seconds = time.perf_counter() - started
        report["stages"] = [
            *report["stages"],
            {"name": "search", "metrics": {"candidates": len(report["candidates"])}},
            {"name": "export", "seconds": seconds, "metrics": {}},
        ]
        return report

    recorder = Recorder(runtime, job_id, claimed.worker_id, None, span=SHARE["export"])
    return run_work(runtime, job_id, claimed, work, folder, recorder)
