"""The service on PostgreSQL + Redis with real `distillery api` and `distillery worker`
processes: a job end to end, and cancel. (Faults: tests/reliability/.)"""

import hashlib
import json

import pytest

from tests.service_support import TINY_SPEC, sse_events, wait_for_status, wait_until


@pytest.fixture(scope="module")
def worker(stack):
    return stack.start_worker()


def test_a_job_runs_to_success_with_metrics_and_artifacts(stack, worker):
    with stack.client() as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        done = wait_for_status(c, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done["error"]
        assert done["progress"] == 1.0 and done["attempts"] == 1 and done["error"] is None
        assert [(s["name"], s["status"]) for s in done["stages"]] == [
            (n, "succeeded")
            for n in ("data", "teacher", "baseline", "distill", "prune", "quantize", "export")
        ]
        assert all(s["seconds"] > 0 for s in done["stages"])
        for model in ("teacher", "student", "pruned", "quantized", "final"):
            assert {"accuracy", "params", "size_bytes", "latency_ms"} <= set(
                done["metrics"][model]
            ), model
        assert done["metrics"]["final"]["size_ratio"] > 1

        events = sse_events(c, job["id"])
        statuses = [d["status"] for kind, d in events if kind == "status"]
        assert statuses == ["queued", "running", "succeeded"]
        stage_events = [(d["stage"], d["status"]) for kind, d in events if kind == "stage"]
        assert stage_events[:4] == [
            ("data", "running"),
            ("data", "succeeded"),
            ("teacher", "running"),
            ("teacher", "succeeded"),
        ]
        assert any(kind == "metrics" and d["model"] == "quantized" for kind, d in events)
        progress = [d["progress"] for kind, d in events if kind == "progress"]
        assert progress == sorted(progress) and events[-1] == ("end", {"status": "succeeded"})

        artifacts = {a["name"]: a for a in c.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        assert {
            "model.onnx",
            "model.int8.onnx",
            "model.torchscript.pt",
            "model.safetensors",
            "model_card.json",
            "report.json",
        } <= set(artifacts)
        for a in artifacts.values():
            r = c.get(a["url"])
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == a["sha256"]
            assert len(r.content) == a["bytes"] and r.headers["etag"] == f'"{a["sha256"]}"'
        int8 = artifacts["model.int8.onnx"]
        whole = c.get(int8["url"]).content
        part = c.get(int8["url"], headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == whole[100:200]
        assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
        assert (
            c.get(int8["url"], headers={"If-None-Match": f'"{int8["sha256"]}"'}).status_code == 304
        )
        card = c.get(artifacts["model_card.json"]["url"]).json()
        assert card["spec"]["name"] == "tiny" and "path" not in json.dumps(card["spec"]["dataset"])


def test_cancel_a_running_job(stack, worker):
    slow = {**TINY_SPEC, "teacher": {"arch": "cnn_small", "epochs": 500}}
    with stack.client() as c:
        job = c.post("/v1/jobs", json=slow).json()
        wait_for_status(c, job["id"], {"running"}, timeout=60)
        wait_until(
            lambda: c.get(f"/v1/jobs/{job['id']}").json()["progress"] > 0, 60, what="progress"
        )
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["status"] in ("cancelling", "cancelled")
        done = wait_for_status(c, job["id"], {"cancelled", "failed", "succeeded"}, timeout=30)
        assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
        stages = {s["name"]: s["status"] for s in done["stages"]}
        assert stages["data"] == "succeeded" and stages["teacher"] == "cancelled"
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
