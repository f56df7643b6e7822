"""The search's join, on the database alone (SQLite and PostgreSQL): the branches are made
once, the parent waits with no worker, only one worker may finish it and only once every
branch has ended, and its progress never falls back on the way."""

from __future__ import annotations

from sqlalchemy import select

from app.jobs import lifecycle, search
from app.jobs.states import JobStatus, StageStatus
from app.models import Job, utcnow
from app.testing import LEARNING_SPEC

SEARCH = {
    **LEARNING_SPEC,
    "search": {"student": [{"arch": "cnn_tiny"}, {"arch": "mlp"}], "prune.amount": [0, 0.3]},
}


def _progress(api, job_id: str) -> float:
    with api.client("searcher") as c:
        return c.get(f"/v1/jobs/{job_id}").json()["progress"]


def test_a_search_is_finished_once_and_only_after_its_branches(api):
    with api.client("searcher") as c:
        r = c.post("/v1/jobs", json=SEARCH)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    with api.db.session() as s:
        assert lifecycle.claim(s, job_id=job_id, worker_id="w1", stale_before=utcnow(), max_attempts=3)  # fmt: skip
        lifecycle.set_progress(s, job_id=job_id, worker_id="w1", progress=0.2, stage="teacher")
        assert lifecycle.wait_for_branches(s, job_id=job_id, worker_id="w0", count=2) is None
        sent = lifecycle.wait_for_branches(s, job_id=job_id, worker_id="w1", count=2)
    assert sent is not None and len(sent) == 2
    with api.db.session() as s:  # a re-run of the teacher's task finds the same branches
        parent = s.scalar(select(Job).where(Job.id == job_id))
        parent.worker_id = "w1"
        again = lifecycle.wait_for_branches(s, job_id=job_id, worker_id="w1", count=2)
    assert again == sent
    (a, _), (b, _) = sent

    def end(branch_id: str) -> None:
        with api.db.session() as s:
            assert lifecycle.claim(s, job_id=branch_id, worker_id=f"w-{branch_id}", stale_before=utcnow(), max_attempts=3)  # fmt: skip
            assert lifecycle.finish(s, job_id=branch_id, worker_id=f"w-{branch_id}", status=JobStatus.SUCCEEDED)  # fmt: skip

    assert _progress(api, job_id) == 0.2
    end(a)
    with api.db.session() as s:
        assert not search.branches_ended(s, job_id=job_id)
        assert search.claim_finish(s, job_id=job_id, worker_id="f1", progress=0.95) is None
    assert _progress(api, job_id) == 0.2 + 0.75 / 2  # one branch of two done
    end(b)
    with api.db.session() as s:
        assert search.branches_ended(s, job_id=job_id)
        won = search.claim_finish(s, job_id=job_id, worker_id="f1", progress=0.95)
        assert won is not None and won.worker_id == "f1"
    with api.db.session() as s:
        assert search.claim_finish(s, job_id=job_id, worker_id="f2", progress=0.95) is None
        stage = s.scalar(select(Job).where(Job.id == job_id)).stage
    assert stage == "search" and _progress(api, job_id) == 0.95
    # The export has begun but has not reported progress yet: still 0.95, not back at the
    # teacher's 0.2 (the stored progress until the finishing worker claimed the search).
    with api.db.session() as s:
        lifecycle.set_stage(s, job_id=job_id, worker_id="f1", name="export", status=StageStatus.RUNNING)  # fmt: skip
    assert _progress(api, job_id) == 0.95
    with api.client("searcher") as c:  # the branches are shown on the search, not listed
        assert [j["id"] for j in c.get("/v1/jobs").json()["data"]] == [job_id]
