"""README's first command: `distillery serve` alone (SQLite, SQLite broker, local storage)
runs a job submitted over HTTP to success."""

import hashlib
import subprocess

import numpy as np
import onnxruntime as ort

from tests.service_support import TINY_SPEC, cli, client, keys_create, wait_until


def test_serve_runs_a_job_and_serves_the_int8_model(served, tmp_path):
    url, key, home = served
    with client(url, key) as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        assert job["status"] == "queued"
        done = wait_until(
            lambda: (
                (j := c.get(f"/v1/jobs/{job['id']}").json())["status"] in ("succeeded", "failed")
                and j
            ),
            240,
            interval=0.5,
            what="the job",
        )
        assert done["status"] == "succeeded", done["error"]
        artifacts = {a["name"]: a for a in c.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        int8 = artifacts["model.int8.onnx"]
        body = c.get(int8["url"]).content
        # TINY_SPEC's int8 file is bigger than the pruned float model: the final is the latter,
        # marked so by the worker's record, and served at a name that does not change.
        assert done["metrics"]["final"]["model"] == "pruned"
        assert [n for n, a in artifacts.items() if a["final"]] == ["model.onnx"]
        final = c.get(f"/v1/jobs/{job['id']}/artifacts/final")
        assert final.headers["etag"] == f'"{artifacts["model.onnx"]["sha256"]}"'
        assert hashlib.sha256(final.content).hexdigest() == artifacts["model.onnx"]["sha256"]
    assert hashlib.sha256(body).hexdigest() == int8["sha256"]
    path = tmp_path / "model.int8.onnx"
    path.write_bytes(body)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.zeros((3, 1, 8, 8), np.float32)})[0]
    assert logits.shape == (3, 10)
    # Everything lives under DISTILLERY_HOME.
    assert (home / "home" / "distillery.db").exists() and (home / "home" / "broker.db").exists()
    assert (home / "home" / "storage" / "jobs" / job["id"] / "model.int8.onnx").exists()


def test_keys_create_makes_a_working_key_for_a_new_tenant(served):
    url, default_key, home = served
    env = {"DISTILLERY_HOME": str(home / "home"), "DATABASE_URL": "", "BROKER_URL": ""}
    key = keys_create(home / "home", "acme")
    assert key.startswith("dk_") and key != default_key
    with client(url, key) as c:
        r = c.get("/v1/jobs")
        assert r.status_code == 200 and r.json()["data"] == []  # acme sees none of default's jobs
    revoke = cli("keys", "revoke", key, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    revoke.communicate(timeout=120)
    assert revoke.returncode == 0
    with client(url, key) as c:
        assert c.get("/v1/jobs").status_code == 401
