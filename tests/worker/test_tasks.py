"""The Celery task's own handling of a job, against the live API's database: a job submitted
and read over HTTP, run by `execute` in this process (the task body a worker calls)."""

from __future__ import annotations

from app.core.storage import Storage
from tests.service_support import TINY_SPEC, assert_no_server_path, sse_events


def test_a_crashed_job_says_what_failed_without_naming_server_paths(api):
    from worker.runtime import Runtime
    from worker.tasks import execute_job

    runtime = Runtime(api.settings, api.db, Storage(api.settings.storage_dir))
    with api.client("crasher") as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        # A file where the job's folder goes: the pipeline's first write fails with an OSError
        # that names the folder in storage (as a full disk or a lost mount would).
        job_dir = Storage(api.settings.storage_dir).job_dir(job["id"])
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
