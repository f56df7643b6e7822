"""The Celery task's own handling of a job, against the live API's database: a job submitted
and read over HTTP, run by `execute` in this process (the task body a worker calls)."""

from __future__ import annotations

from app.core.storage import LocalStorage
from tests.service_support import TINY_SPEC, assert_no_server_path, sse_events
from worker.runtime import Runtime


def test_a_crashed_job_says_what_failed_without_naming_server_paths(api):
    from worker.tasks import execute_job

    runtime = Runtime(api.settings, api.db, LocalStorage(api.settings.storage_dir))
    with api.client("crasher") as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        # A file where the job's folder goes: the pipeline's first write fails with an OSError
        # that names the folder in storage (as a full disk or a lost mount would).
        job_dir = runtime.storage.local_path(f"jobs/{job['id']}")
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        job_dir.write_bytes(b"")
        assert execute_job(runtime, job["id"]) == "failed"
        error = c.get(f"/v1/jobs/{job['id']}").json()["error"]
        events = sse_events(c, job["id"])
    assert error == {
        "code": "internal_error",
        "message": f"FileExistsError: [Errno 17] File exists: '{job['id']}'",
    }
    assert_no_server_path(error["message"], api.settings)
    assert [d["error"] for kind, d in events if kind == "status" and "error" in d] == [error]


RUNS = [("teacher", "teacher", 1), ("teacher", "teacher", 2)] + [
    (stage, stage, k) for stage in ("baseline", "distill") for k in (1, 2)
]
HEADER = "stage,run,epoch,step,lr,loss,task_loss,kd_loss,feature_loss,val_accuracy,seconds"


def test_every_epoch_is_stored_and_served_as_json_csv_and_artifact(api):
    from worker.tasks import execute_job

    runtime = Runtime(api.settings, api.db, LocalStorage(api.settings.storage_dir))
    with api.client("curves") as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        assert c.get(f"/v1/jobs/{job['id']}/history").json() == {"data": []}
        assert execute_job(runtime, job["id"]) == "succeeded"
        rows = c.get(f"/v1/jobs/{job['id']}/history").json()["data"]
        csv_text = c.get(f"/v1/jobs/{job['id']}/history", headers={"Accept": "text/csv"})
        artifact = c.get(f"/v1/jobs/{job['id']}/artifacts/history.csv")
        listed = {
            a["name"]: a["format"] for a in c.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        }
        events = sse_events(c, job["id"])
        with api.client("someone-else") as other:
            assert other.get(f"/v1/jobs/{job['id']}/history").status_code == 404
    # TINY_SPEC: teacher 2 epochs, baseline and distill 2 each, one prune fine-tune epoch.
    assert [(r["stage"], r["run"], r["epoch"]) for r in rows] == RUNS + [("prune", "finetune1", 1)]
    assert list(rows[0]) == HEADER.split(",")
    assert all(0 <= r["val_accuracy"] <= 1 and r["loss"] > 0 and r["step"] > 0 for r in rows)
    assert [r["kd_loss"] is None for r in rows] == [True] * 4 + [False] * 3
    # Every row went out as an event too, while progress events are throttled.
    assert [d["run"] for kind, d in events if kind == "history"] == [r["run"] for r in rows]
    assert csv_text.headers["content-type"].startswith("text/csv")
    lines = csv_text.text.splitlines()
    assert lines[0] == HEADER and len(lines) == 1 + len(rows)
    assert lines[1].startswith("teacher,teacher,1,") and ",," in lines[1]  # nulls are empty
    # The API's CSV and the job's own history.csv agree to the last digit.
    assert listed["history.csv"] == "csv" and artifact.text == csv_text.text


def test_a_history_row_replaces_its_runs_rows_from_its_epoch_on(api):
    """What a resumed job does: epochs 1-3 of distill, a crash, then the run again from epoch 2
    (and a worker that lost the job can no longer write)."""
    from sqlalchemy import select

    from app.jobs import history, lifecycle
    from app.models import Job, utcnow
    from app.services import jobs as jobs_service

    with api.client("resumer") as c:
        job_id = c.post("/v1/jobs", json=TINY_SPEC).json()["id"]

    def row(epoch: int, loss: float) -> dict:
        return {
            **dict(stage="distill", run="distill", epoch=epoch, step=10 * epoch, lr=1e-3),
            **dict(loss=loss, task_loss=loss, kd_loss=loss / 2, feature_loss=None),
            **dict(val_accuracy=0.5, seconds=float(epoch)),
        }

    def record(worker_id: str, *rows: dict) -> bool:
        with api.db.session() as s:
            return history.record_history(s, job_id=job_id, worker_id=worker_id, rows=list(rows))

    def stored() -> list[tuple[int, float]]:
        with api.db.session() as s:
            tenant = s.scalar(select(Job.tenant_id).where(Job.id == job_id))
            return [
                (r.epoch, r.loss)
                for r in jobs_service.history_of(s, tenant_id=tenant, job_id=job_id)
            ]

    with api.db.session() as s:
        now = utcnow()
        assert lifecycle.claim(s, job_id=job_id, worker_id="w1", stale_before=now, max_attempts=3)
    assert record("w1", row(1, 3.0), row(2, 2.0), row(3, 1.0))
    assert stored() == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert record("w1", row(2, 2.5))
    assert not record("w0", row(4, 9.0))
    assert stored() == [(1, 3.0), (2, 2.5)]
