"""The job state machine on a real database (SQLite and PostgreSQL, the `api` fixture's): every
(from, to) pair of statuses, the fence that keeps a worker which lost its job from changing
it, and what a cancel does from each status. Jobs reach each status the way the service moves
them (create, claim, cancel, finish), never by writing the column. Each test makes its own
tenant and looks only at its own rows: the database is shared with the other API tests."""

from __future__ import annotations

import uuid
from datetime import timedelta
from itertools import product

import pytest
from sqlalchemy import func, select

from app.jobs import history, lifecycle
from app.jobs.states import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobStatus,
    StageStatus,
    check_transition,
)
from app.models import Job, JobEvent, utcnow
from app.services import tenants
from tests.service_support import TINY_SPEC

Q, R, C = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING
S, F, X = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED

# The lifecycle as DESIGN.md tells it, written out here rather than read from the code.
ALLOWED = {
    (Q, R),  # claimed
    (Q, X),  # cancelled before it started
    (R, R),  # re-claimed: its worker stopped heartbeating
    (R, Q),  # released: its worker died, attempts remain
    (R, C),  # cancel asked while it runs
    (R, S),
    (R, F),
    (R, X),
    (C, X),
    (C, S),  # finished before it saw the cancel
    (C, F),
}
PAIRS = list(product(JobStatus, JobStatus))
LATER = timedelta(hours=1)  # a stale_before this far ahead makes any holder look silent


def test_the_transitions_are_the_documented_lifecycle():
    assert set(TRANSITIONS) == set(JobStatus)
    assert {(f, t) for f, targets in TRANSITIONS.items() for t in targets} == ALLOWED
    assert {s for s in JobStatus if not TRANSITIONS[s]} == TERMINAL == {S, F, X}


@pytest.mark.parametrize(("frm", "to"), PAIRS, ids=[f"{f}-{t}" for f, t in PAIRS])
def test_check_transition_allows_exactly_the_listed_pairs(frm, to):
    if (frm, to) in ALLOWED:
        check_transition("job_x", frm, to)
    else:
        with pytest.raises(IllegalTransition) as e:
            check_transition("job_x", frm, to)
        assert (e.value.frm, e.value.to) == (frm, to)


# --- a job in each status, reached through the lifecycle ---------------------------------------


def _tenant(api) -> str:
    with api.db.session() as s:
        return tenants.ensure_tenant(s, name=f"states-{uuid.uuid4().hex[:8]}").id


def _claim(api, job_id: str, worker_id: str, *, stale_before=None) -> Job | None:
    with api.db.session() as s:
        return lifecycle.claim(
            s,
            job_id=job_id,
            worker_id=worker_id,
            stale_before=stale_before or utcnow(),
            max_attempts=3,
        )


def _finish(api, job_id: str, worker_id: str, status: JobStatus) -> bool:
    error = None if status == S else (str(status), f"ended {status}")
    with api.db.session() as s:
        return lifecycle.finish(s, job_id=job_id, worker_id=worker_id, status=status, error=error)


def _job_in(api, tenant_id: str, status: JobStatus) -> str:
    with api.db.session() as s:
        job = lifecycle.create(
            s, tenant_id=tenant_id, name=f"in {status}", spec=TINY_SPEC, queue="q",
            stages=["teacher", "distill"], idempotency_key=None, request_hash="h",
        )  # fmt: skip
        job_id = job.id
    if status == Q:
        return job_id
    assert _claim(api, job_id, "host:1/a")
    if status == C:
        _cancel(api, job_id)
    elif status in TERMINAL:
        assert _finish(api, job_id, "host:1/a", status)
    assert _read(api, job_id).status == status
    return job_id


def _read(api, job_id: str) -> Job:
    with api.db.session() as s:
        return s.scalars(select(Job).where(Job.id == job_id)).one()


def _cancel(api, job_id: str) -> bool:
    with api.db.session() as s:
        return lifecycle.cancel(s, job=s.scalars(select(Job).where(Job.id == job_id)).one())


def _events(api, job_id: str) -> int:
    with api.db.session() as s:
        return s.scalar(select(func.count()).where(JobEvent.job_id == job_id))


def test_every_pair_moves_a_stored_job_or_raises_and_leaves_it(api):
    tenant_id = _tenant(api)
    for frm, to in PAIRS:
        job_id = _job_in(api, tenant_id, frm)
        events = _events(api, job_id)
        if (frm, to) in ALLOWED:
            with api.db.session() as s:
                job = s.scalars(select(Job).where(Job.id == job_id)).one()
                lifecycle.move(s, job, to, now=utcnow())
            after = _read(api, job_id)
            assert after.status == to, (frm, to)
            assert (after.finished_at is not None) == (to in TERMINAL), (frm, to)
            assert _events(api, job_id) == events + 1  # the move is announced
        else:
            with pytest.raises(IllegalTransition), api.db.session() as s:
                job = s.scalars(select(Job).where(Job.id == job_id)).one()
                lifecycle.move(s, job, to, now=utcnow())
            assert _read(api, job_id).status == frm, (frm, to)
            assert _events(api, job_id) == events


# --- claim fencing -------------------------------------------------------------------------------


def test_one_claim_wins_and_a_live_holder_keeps_its_job(api):
    job_id = _job_in(api, _tenant(api), Q)
    assert _claim(api, job_id, "host:1/a")
    # The same message delivered twice, or to a second worker while the first still beats.
    assert _claim(api, job_id, "host:2/b", stale_before=utcnow() - LATER) is None
    job = _read(api, job_id)
    assert (job.worker_id, job.attempts, job.status) == ("host:1/a", 1, R)


def test_a_worker_that_lost_its_job_can_no_longer_change_it(api):
    """host:1/a's attempt falls silent and host:1/b (the same process, a new attempt token)
    takes the job over: every write of the old attempt is refused, the new one's land."""
    job_id = _job_in(api, _tenant(api), Q)
    old, new = "host:1/a", "host:1/b"
    assert _claim(api, job_id, old)
    with api.db.session() as s:
        assert lifecycle.set_progress(
            s, job_id=job_id, worker_id=old, stage="teacher", progress=0.2
        )
    taken = _claim(api, job_id, new, stale_before=utcnow() + LATER)
    assert taken is not None and taken.attempts == 2
    row = {"run": "distill", "epoch": 1, "stage": "distill", "loss": 1.0}
    with api.db.session() as s:
        assert lifecycle.heartbeat(s, job_id=job_id, worker_id=old) == (False, False)
        assert not lifecycle.set_progress(s, job_id=job_id, worker_id=old, stage="distill", progress=0.9)  # fmt: skip
        assert lifecycle.set_stage(s, job_id=job_id, worker_id=old, name="distill", status=StageStatus.RUNNING) is None  # fmt: skip
        lifecycle.set_model_metrics(s, job_id=job_id, worker_id=old, model="student", metrics={"a": 1})  # fmt: skip
        assert not history.record_history(s, job_id=job_id, worker_id=old, rows=[row])
        assert lifecycle.wait_for_branches(s, job_id=job_id, worker_id=old, count=2) is None
    assert not _finish(api, job_id, old, S)
    job = _read(api, job_id)
    assert (job.status, job.worker_id, job.stage, job.progress) == (R, new, "teacher", 0.2)
    assert job.metrics == {}
    with api.db.session() as s:
        assert lifecycle.heartbeat(s, job_id=job_id, worker_id=new) == (True, False)
    assert _finish(api, job_id, new, S)
    assert _read(api, job_id).status == S
    with api.db.session() as s:  # an ended job belongs to nobody, its last holder included
        assert lifecycle.heartbeat(s, job_id=job_id, worker_id=new) == (False, False)
    assert _claim(api, job_id, "host:3/c", stale_before=utcnow() + LATER) is None


def test_a_job_that_used_its_attempts_is_not_claimed_again(api):
    job_id = _job_in(api, _tenant(api), Q)
    for n, worker in enumerate(["w:1/a", "w:2/b", "w:3/c"], start=1):
        assert _claim(api, job_id, worker, stale_before=utcnow() + LATER).attempts == n
    assert _claim(api, job_id, "w:4/d", stale_before=utcnow() + LATER) is None
    assert _read(api, job_id).worker_id == "w:3/c"


# --- cancel from each status ---------------------------------------------------------------------


def test_cancel_a_queued_job_ends_it_and_no_worker_takes_it(api):
    job_id = _job_in(api, _tenant(api), Q)
    assert _cancel(api, job_id)
    job = _read(api, job_id)
    assert (job.status, job.error_code, job.cancel_requested) == (X, "cancelled", True)
    assert job.finished_at is not None
    assert _claim(api, job_id, "host:1/a") is None  # its message, arriving late


def test_cancel_a_running_job_asks_its_worker_to_stop(api):
    job_id = _job_in(api, _tenant(api), R)
    assert _cancel(api, job_id)
    job = _read(api, job_id)
    assert (job.status, job.cancel_requested, job.finished_at) == (C, True, None)
    with api.db.session() as s:  # what the worker sees at its next batch
        assert lifecycle.heartbeat(s, job_id=job_id, worker_id="host:1/a") == (True, True)
    assert _finish(api, job_id, "host:1/a", X)
    assert _read(api, job_id).status == X


def test_cancel_a_cancelling_job_again_is_accepted_and_changes_nothing(api):
    job_id = _job_in(api, _tenant(api), C)
    events = _events(api, job_id)
    assert _cancel(api, job_id)
    assert _read(api, job_id).status == C
    assert _events(api, job_id) == events


@pytest.mark.parametrize("ended", [S, F, X])
def test_cancel_an_ended_job_is_refused_and_changes_nothing(api, ended):
    job_id = _job_in(api, _tenant(api), ended)
    before, events = _read(api, job_id), _events(api, job_id)
    assert not _cancel(api, job_id)
    after = _read(api, job_id)
    assert (after.status, after.error_code, after.finished_at, after.cancel_requested) == (
        before.status,
        before.error_code,
        before.finished_at,
        before.cancel_requested,
    )
    assert _events(api, job_id) == events
