import concurrent.futures
import copy

import pytest

from tests.service_support import TINY_SPEC


def test_submit_returns_a_queued_job_with_its_plan(api):
    with api.client() as c:
        r = c.post("/v1/jobs", json=TINY_SPEC)
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["id"].startswith("job_") and job["status"] == "queued" and job["progress"] == 0.0
        assert [s["name"] for s in job["stages"]] == [
            "data",
            "teacher",
            "baseline",
            "distill",
            "prune",
            "quantize",
            "export",
        ]
        assert all(s["status"] == "pending" for s in job["stages"])
        assert job["spec"]["student"]["arch"] == "cnn_tiny" and job["spec"]["seed"] == 0  # resolved
        assert job["queue"] == api.settings.DEFAULT_QUEUE and job["error"] is None
        again = c.get(f"/v1/jobs/{job['id']}").json()
        assert again["id"] == job["id"] and again["created_at"] == job["created_at"]


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"student": {"arch": "nope"}}, "student.arch: Value error, unknown arch 'nope'; known:"),
        ({"distill": {"alpha": 2}}, "distill.alpha: Input should be less than or equal to 1"),
        (
            {"dataset": {"source": "npz", "path": "/etc/passwd"}},
            "dataset.source: 'npz' reads a path on the server",
        ),
        (
            {"teacher": {"source": "onnx", "path": "/tmp/x.onnx"}},
            "teacher.source: 'onnx' reads a path on the server",
        ),
        (
            {"dataset": {"source": "torchvision", "name": "MNIST", "download": True}},
            "dataset.download: this service does not download",
        ),
        (
            {"dataset": {"source": "upload", "id": "ds_missing"}},
            "dataset.id: no dataset 'ds_missing'",
        ),
        (
            {"teacher": {"source": "upload", "id": "mdl_missing"}},
            "teacher.id: no model 'mdl_missing'",
        ),
        (
            {"student": {"arch": "mlp", "arch_kwargs": {"hidden": "x"}}},
            "student.arch: 'mlp' does not fit input [1, 8, 8]",
        ),
        (
            {"student": {"arch": "cnn_small", "arch_kwargs": {"widths": [0]}}},
            "student.arch: 'cnn_small' does not fit",
        ),
        (
            {"gates": {"min_speedupp": 2}},
            "gates: Value error, unknown gate 'min_speedupp'; known: max_accuracy_drop, "
            "min_size_ratio, min_speedup, min_accuracy, max_slowdown",
        ),
        ({"quantize": {"weight_bits": 6}}, "quantize.weight_bits: Input should be 7 or 8"),
        (
            {"quantize": {"method": "qat4"}},
            "quantize.method: Value error, unknown quantizer 'qat4'; known: fp16, int8_dynamic, "
            "int8_static, qat",
        ),
        (
            {"quantize": {"calibration": "kl"}},
            "quantize.calibration: Value error, unknown calibration 'kl'; known: entropy, "
            "minmax, percentile",
        ),
        (
            {"search": {"quantize.calibration": ["minmax", "mse"]}},
            "search.quantize.calibration[1]: Value error, unknown calibration 'mse'",
        ),
    ],
)
def test_invalid_specs_are_refused_before_queueing(api, spec, field):
    with api.client() as c:
        before = c.get("/v1/jobs", params={"limit": 200}).json()["data"]
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_spec"
        assert field in r.json()["error"]["message"]
        assert c.get("/v1/jobs", params={"limit": 200}).json()["data"] == before


def test_malformed_json_is_a_422_not_a_500(api):
    with api.client() as c:
        r = c.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec"


def test_list_is_newest_first_with_cursor_pages_and_status_filter(api):
    with api.client("lister") as c:
        ids = [
            c.post("/v1/jobs", json={**TINY_SPEC, "name": f"j{i}"}).json()["id"] for i in range(5)
        ]
        c.post(f"/v1/jobs/{ids[1]}/cancel")
        page1 = c.get("/v1/jobs", params={"limit": 2}).json()
        assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"]
        page2 = c.get("/v1/jobs", params={"limit": 2, "after": page1["next_after"]}).json()
        page3 = c.get("/v1/jobs", params={"limit": 2, "after": page2["next_after"]}).json()
        assert [j["id"] for j in page2["data"] + page3["data"]] == ids[::-1][2:]
        assert not page3["has_more"] and page3["next_after"] is None
        cancelled = c.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]
        assert [j["id"] for j in cancelled] == [ids[1]]
        assert c.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
        assert c.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_cancel_a_queued_job_ends_it_and_a_second_cancel_conflicts(api):
    with api.client() as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["status"] == "cancelled"
        assert r.json()["error"]["code"] == "cancelled"
        again = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_state_conflict"
        assert c.post("/v1/jobs/job_nope/cancel").status_code == 404


def test_idempotency_key_returns_the_same_job_and_refuses_a_different_body(api):
    with api.client() as c:
        headers = {"Idempotency-Key": "build-1234"}
        first = c.post("/v1/jobs", json=TINY_SPEC, headers=headers)
        second = c.post("/v1/jobs", json=TINY_SPEC, headers=headers)
        assert first.status_code == 201 and second.status_code == 200
        assert second.headers["Idempotent-Replayed"] == "true"
        assert first.json()["id"] == second.json()["id"]
        other = copy.deepcopy(TINY_SPEC)
        other["seed"] = 7
        r = c.post("/v1/jobs", json=other, headers=headers)
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    # Keys are per tenant: another tenant's same key makes its own job.
    with api.client("bob") as c:
        assert (
            c.post("/v1/jobs", json=TINY_SPEC, headers=headers).json()["id"] != first.json()["id"]
        )


def test_an_expired_idempotency_key_makes_a_new_job(api):
    """A CI re-run that reuses its key a day later gets a fresh job, not the old failed one
    replayed forever; within the TTL the key still replays."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.models import Job, utcnow

    headers = {"Idempotency-Key": "nightly-" + api.settings.DEFAULT_QUEUE}
    with api.client() as c:
        old = c.post("/v1/jobs", json=TINY_SPEC, headers=headers).json()
        stale = utcnow() - timedelta(seconds=api.settings.IDEMPOTENCY_TTL_SECONDS + 60)
        with api.db.session() as s:
            s.execute(update(Job).where(Job.id == old["id"]).values(created_at=stale))
        other = copy.deepcopy(TINY_SPEC)
        other["seed"] = 3  # a different body is no conflict once the key has expired
        fresh = c.post("/v1/jobs", json=other, headers=headers)
        assert fresh.status_code == 201 and "Idempotent-Replayed" not in fresh.headers
        assert fresh.json()["id"] != old["id"]
        again = c.post("/v1/jobs", json=other, headers=headers)
        assert again.status_code == 200 and again.json()["id"] == fresh.json()["id"]
        assert c.get(f"/v1/jobs/{old['id']}").status_code == 200  # the old job stays


def test_concurrent_posts_with_one_idempotency_key_make_one_job(api):
    key = "race-" + api.settings.DEFAULT_QUEUE
    api.key("racer")  # the tenant exists before the race

    def submit(_):
        with api.client("racer") as c:
            r = c.post("/v1/jobs", json=TINY_SPEC, headers={"Idempotency-Key": key})
            return r.status_code, r.json()["id"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(submit, range(32)))
    assert {status for status, _ in results} <= {200, 201}
    assert [status for status, _ in results].count(201) == 1
    assert len({job_id for _, job_id in results}) == 1
    with api.client("racer") as c:
        assert len(c.get("/v1/jobs", params={"limit": 200}).json()["data"]) == 1


def test_events_of_a_queued_job_replay_its_history(api):
    with api.client() as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        c.post(f"/v1/jobs/{job['id']}/cancel")
        r = c.get(f"/v1/jobs/{job['id']}/events")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kinds = [
            line.split(": ", 1)[1] for line in r.text.splitlines() if line.startswith("event: ")
        ]
        assert kinds == ["status", "status", "end"]
        assert '"status": "queued"' in r.text and '"status": "cancelled"' in r.text
        # Resuming after the first event skips it.
        first_id = next(
            line.split(": ")[1] for line in r.text.splitlines() if line.startswith("id: ")
        )
        resumed = c.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": first_id}).text
        assert '"status": "queued"' not in resumed and '"status": "cancelled"' in resumed


def test_openapi_documents_every_route_and_its_errors(api):
    with api.client(None) as c:
        doc = c.get("/openapi.json").json()
    paths = doc["paths"]
    for path in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/history",
        "/v1/jobs/{job_id}/artifacts",
        "/v1/jobs/{job_id}/artifacts/{name}",
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/models",
        "/v1/models/{model_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    assert {"401", "409", "413", "422"} <= set(paths["/v1/jobs"]["post"]["responses"])
    assert {"404", "409"} <= set(paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"])
    assert "413" in paths["/v1/datasets"]["post"]["responses"]
    history = paths["/v1/jobs/{job_id}/history"]["get"]["responses"]
    assert {"401", "404"} <= set(history) and {"application/json", "text/csv"} <= set(
        history["200"]["content"]
    )
