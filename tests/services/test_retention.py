"""Retention on a live API (SQLite and PostgreSQL) with the local-folder store: what goes,
what stays, and what the API then answers. Each test has a tenant of its own and looks only
at its own rows: the database is shared with the other API tests."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta

import numpy as np
from sqlalchemy import select, update

from app.core.storage import LocalStorage
from app.jobs import lifecycle
from app.jobs.reaper import Reaper
from app.jobs.states import JobStatus
from app.models import Dataset, Job, Sweep, UploadedModel, utcnow
from app.services import retention
from tests.service_support import TINY_SPEC

TTL = 30.0


def _storage(api) -> LocalStorage:
    return LocalStorage(api.settings.storage_dir)


def _age(api, model, row_id: str, days: float, **columns: str) -> None:
    """Move `columns` (timestamps) of a row `days` into the past."""
    then = utcnow() - timedelta(days=days)
    with api.db.session() as s:
        s.execute(update(model).where(model.id == row_id).values(**dict.fromkeys(columns, then)))


def _finished_job(api, c, *, ended_days_ago: float, files: dict[str, bytes]) -> str:
    """A job run as a worker runs one (claimed, its files written, finished with its
    artifacts), which ended `ended_days_ago`."""
    job_id = c.post("/v1/jobs", json=TINY_SPEC).json()["id"]
    with api.db.session() as s:
        assert lifecycle.claim(
            s, job_id=job_id, worker_id="w/1", stale_before=utcnow(), max_attempts=3
        )
    artifacts = []
    for name, data in files.items():
        path = api.settings.storage_dir / "jobs" / job_id / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        artifacts.append(
            {"name": name, "format": "onnx", "bytes": len(data), "sha256": digest,
             "path": f"jobs/{job_id}/{name}"}
        )  # fmt: skip
    with api.db.session() as s:
        assert lifecycle.finish(
            s, job_id=job_id, worker_id="w/1", status=JobStatus.SUCCEEDED, artifacts=artifacts
        )
    _age(api, Job, job_id, ended_days_ago, finished_at="finished_at")
    return job_id


def _sweep(api, *, dry_run=False, artifacts=None, uploads=None) -> retention.Plan:
    return retention.sweep(
        api.db,
        _storage(api),
        artifact_ttl_days=artifacts,
        upload_ttl_days=uploads,
        dry_run=dry_run,
    )


def _mine(found: retention.Plan, tenant: str) -> tuple[list[str], list[str]]:
    return (
        [j.id for j in found.jobs if j.tenant == tenant],
        sorted(u.id for u in found.uploads if u.tenant == tenant),
    )


def test_a_job_past_its_ttl_loses_its_files_and_answers_410_a_fresh_one_keeps_them(api):
    tenant = "ret-jobs"
    with api.client(tenant) as c:
        old = _finished_job(api, c, ended_days_ago=TTL + 5, files={"model.onnx": b"o" * 300})
        fresh = _finished_job(api, c, ended_days_ago=TTL - 5, files={"model.onnx": b"f" * 200})
        jobs = api.settings.storage_dir / "jobs"

        planned = _sweep(api, dry_run=True, artifacts=TTL)
        assert _mine(planned, tenant) == ([old], [])
        (entry,) = [j for j in planned.jobs if j.id == old]
        assert (entry.files, entry.bytes) == (1, 300)
        assert (jobs / old / "model.onnx").is_file()  # a dry run deletes nothing
        assert c.get(f"/v1/jobs/{old}/artifacts/model.onnx").content == b"o" * 300

        assert _mine(_sweep(api, artifacts=TTL), tenant) == ([old], [])
        assert not (jobs / old).exists()
        for path in ("artifacts", "artifacts/model.onnx"):
            r = c.get(f"/v1/jobs/{old}/{path}")
            assert r.status_code == 410, r.text
            assert r.json()["error"]["code"] == "artifacts_expired"
        job = c.get(f"/v1/jobs/{old}").json()
        assert job["status"] == "succeeded" and job["artifacts_expired_at"] is not None
        assert c.get(f"/v1/jobs/{fresh}").json()["artifacts_expired_at"] is None
        assert c.get(f"/v1/jobs/{fresh}/artifacts/model.onnx").content == b"f" * 200
        assert [a["name"] for a in c.get(f"/v1/jobs/{fresh}/artifacts").json()["data"]] == [
            "model.onnx"
        ]
        assert _mine(_sweep(api, dry_run=True, artifacts=TTL), tenant) == ([], [])  # done once


def test_a_search_expires_with_its_branches_files(api):
    tenant = "ret-search"
    with api.client(tenant) as c:
        search = _finished_job(api, c, ended_days_ago=TTL + 1, files={"model.onnx": b"s"})
        with api.db.session() as s:
            parent = s.scalar(select(Job).where(Job.id == search))
            branch = Job(
                tenant_id=parent.tenant_id,
                name="branch",
                spec=parent.spec,
                queue=parent.queue,
                parent_id=search,
                branch=0,
                status="succeeded",
                started_at=parent.started_at,
                finished_at=utcnow() - timedelta(days=TTL + 2),
            )
            s.add(branch)
            s.flush()
            branch_id = branch.id
        root = api.settings.storage_dir / "jobs"
        for path in (root / search / ".work/branches/0/ckpt.pt", root / branch_id / "x.bin"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"12345")

        planned = _sweep(api, dry_run=True, artifacts=TTL)
        assert _mine(planned, tenant) == ([search], [])  # the branch is not a job of its own
        (entry,) = [j for j in planned.jobs if j.id == search]
        assert (entry.branches, entry.files, entry.bytes) == ((branch_id,), 3, 11)
        _sweep(api, artifacts=TTL)
        assert not (root / search).exists() and not (root / branch_id).exists()
        r = c.get(f"/v1/jobs/{branch_id}/artifacts")
        assert r.status_code == 410 and r.json()["error"]["code"] == "artifacts_expired"


def _npz(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, x=rng.random((20, 1, 8, 8), dtype=np.float32), y=np.arange(20) % 2)
    return buf.getvalue()


def _dataset(api, c, seed: int, *, days_old: float) -> str:
    r = c.post("/v1/datasets", files={"file": (f"d{seed}.npz", _npz(seed))})
    assert r.status_code == 201, r.text
    _age(api, Dataset, r.json()["id"], days_old, created_at="created_at")
    return r.json()["id"]


def _job_with(c, ds: str) -> str:
    r = c.post("/v1/jobs", json={**TINY_SPEC, "dataset": {"source": "upload", "id": ds}})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _model(api, c, tmp_path, *, days_old: float) -> str:
    import torch

    from worker.pipeline.archs import build_model
    from worker.pipeline.export import export_onnx

    export_onnx(build_model("mlp", (6,), 3).eval(), torch.zeros(1, 6), tmp_path / "t.onnx")
    r = c.post("/v1/models", files={"file": ("t.onnx", (tmp_path / "t.onnx").read_bytes())})
    assert r.status_code == 201, r.text
    _age(api, UploadedModel, r.json()["id"], days_old, created_at="created_at")
    return r.json()["id"]


def test_uploads_unused_past_their_ttl_go_used_or_fresh_ones_stay(api, tmp_path):
    tenant = "ret-uploads"
    old = TTL + 10
    with api.client(tenant) as c:
        unused = _dataset(api, c, 1, days_old=old)
        recent = _dataset(api, c, 2, days_old=old)  # a job that ended 2 days ago used it
        live = _dataset(api, c, 3, days_old=old)  # a queued job names it
        stale = _dataset(api, c, 4, days_old=old)  # used only by a job that ended long ago
        fresh = _dataset(api, c, 5, days_old=1)
        model = _model(api, c, tmp_path, days_old=old)
        for ds, ended in ((recent, 2), (stale, TTL + 5)):
            job = _job_with(c, ds)
            c.post(f"/v1/jobs/{job}/cancel")
            _age(api, Job, job, ended, created_at="created_at", finished_at="finished_at")
        _job_with(c, live)
        folder = api.settings.storage_dir / "uploads"
        going = sorted([unused, stale, model])

        planned = _sweep(api, dry_run=True, uploads=TTL)
        assert _mine(planned, tenant) == ([], going)
        assert {u.bytes for u in planned.uploads if u.id == unused} == {len(_npz(1))}
        assert all(list(folder.rglob(u)) for u in going)  # a dry run deletes nothing

        assert _mine(_sweep(api, uploads=TTL), tenant) == ([], going)
        for ds in (unused, stale):
            assert c.get(f"/v1/datasets/{ds}").status_code == 404
        assert c.get(f"/v1/models/{model}").status_code == 404
        assert not any(list(folder.rglob(u)) for u in going)  # the files went with the rows
        for ds in (recent, live, fresh):
            assert c.get(f"/v1/datasets/{ds}").status_code == 200
            assert list(folder.rglob(ds))


def test_an_upload_a_job_names_after_the_plan_is_kept(api):
    """Between the plan and the delete a job is submitted with the upload: it stays."""
    with api.client("ret-race") as c:
        ds = _dataset(api, c, 6, days_old=TTL + 1)
        planned = _sweep(api, dry_run=True, uploads=TTL)
        assert _mine(planned, "ret-race") == ([], [ds])
        job = _job_with(c, ds)
        done = retention.apply(api.db, _storage(api), planned)
        assert ds not in [u.id for u in done.uploads]
        (kept,) = [k for k in done.kept if k.id == ds]
        assert job in kept.reason and not kept.store_failed
        assert c.get(f"/v1/datasets/{ds}").status_code == 200


def test_one_reaper_at_a_time_at_most_every_interval_sooner_while_a_backlog_remains(api):
    tenant = "ret-reaper"
    settings = api.settings.model_copy(
        update={"ARTIFACT_TTL_DAYS": TTL, "RETENTION_INTERVAL_SECONDS": 3600, "RETENTION_BATCH": 1}
    )

    def chore(settings=settings) -> retention.Retention:
        return retention.Retention(api.db, settings, _storage(api))

    def expired(job_id: str) -> bool:
        with api.db.session() as s:
            return s.scalar(select(Job.artifacts_expired_at).where(Job.id == job_id)) is not None

    with api.client(tenant) as c:
        older = _finished_job(api, c, ended_days_ago=TTL + 3, files={"a.onnx": b"a"})
        newer = _finished_job(api, c, ended_days_ago=TTL + 2, files={"b.onnx": b"b"})
    assert chore(api.settings)() == {}  # no TTL set: retention is off
    assert not expired(older)
    reaper = Reaper(api.db, settings, lambda *_: None, chores=[chore()])
    other = chore()  # another process's reaper
    with api.db.session() as s:  # as if no pass had run for an hour
        s.execute(update(Sweep).values(next_run_at=utcnow() - timedelta(hours=1)))
    counts = reaper.run_once()
    assert (counts["expired_jobs"], counts["expired_uploads"]) == (1, 0)
    assert expired(older) and not expired(newer)  # oldest first, one per pass (the batch)
    # More was left: the next pass, by any reaper, continues at once...
    assert other() == {"expired_jobs": 1, "expired_uploads": 0}
    assert expired(newer)
    # ...and once nothing is left, no reaper looks again before the interval.
    assert "expired_jobs" not in reaper.run_once() and other() == {}
