"""A stage's record across attempts, on the reaper's path (the job redelivered after its
worker went silent, no supervisor to release it): the stage the silence cut short keeps its
first start and adds up its attempts; the one only reloaded keeps its record. The serve test
(tests/reliability/test_serve.py) does the same with a real kill."""

from __future__ import annotations

from datetime import timedelta

from app.jobs import lifecycle
from app.jobs.states import StageStatus
from app.models import utcnow
from tests.service_support import TINY_SPEC


def _stage(api, c, job_id: str, name: str) -> dict:
    return next(s for s in c.get(f"/v1/jobs/{job_id}").json()["stages"] if s["name"] == name)


def _set(api, job_id: str, worker: str, name: str, status: StageStatus, **kw) -> None:
    with api.db.session() as s:
        lifecycle.set_stage(s, job_id=job_id, worker_id=worker, name=name, status=status, **kw)


def test_a_redelivered_job_keeps_each_stage_s_times(api):
    with api.client("attempts") as c:
        job_id = c.post("/v1/jobs", json=TINY_SPEC).json()["id"]
        with api.db.session() as s:
            assert lifecycle.claim(
                s, job_id=job_id, worker_id="w/1", stale_before=utcnow(), max_attempts=3
            )
        _set(api, job_id, "w/1", "teacher", StageStatus.RUNNING)
        _set(api, job_id, "w/1", "teacher", StageStatus.SUCCEEDED, seconds=1.5, metrics={"a": 1})
        _set(api, job_id, "w/1", "distill", StageStatus.RUNNING)
        teacher, cut = _stage(api, c, job_id, "teacher"), _stage(api, c, job_id, "distill")
        # w/1 falls silent; the message comes back and w/2 takes the stale job over.
        with api.db.session() as s:
            later = utcnow() + timedelta(hours=1)
            assert lifecycle.claim(s, job_id=job_id, worker_id="w/2", stale_before=later,
                                   max_attempts=3)  # fmt: skip
        _set(api, job_id, "w/2", "teacher", StageStatus.SUCCEEDED, resumed=True)
        _set(api, job_id, "w/2", "distill", StageStatus.RUNNING)
        _set(api, job_id, "w/2", "distill", StageStatus.SUCCEEDED, seconds=2.0)
        after_teacher, distill = (
            _stage(api, c, job_id, "teacher"),
            _stage(api, c, job_id, "distill"),
        )
    assert after_teacher == teacher and teacher["seconds"] == 1.5  # as the first worker left it
    first, second = distill["attempts"]
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert distill["started_at"] == cut["started_at"] == first["started_at"]
    assert first["finished_at"] is not None and first["finished_at"] <= second["started_at"]
    assert second["seconds"] == 2.0
    assert distill["seconds"] == first["seconds"] + 2.0
    assert distill["finished_at"] == second["finished_at"]
