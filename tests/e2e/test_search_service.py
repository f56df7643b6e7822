"""Search jobs through the service: embedded `distillery serve` (one worker runs the
search, its branches and the choice in turn) and `api` + two workers on PostgreSQL and
Redis (the branches fan out), with cancel and a worker lost mid-search."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from app.testing import LEARNING_SPEC
from tests.service_support import cli, client, running_stack, wait_for_status, wait_until

STUDENTS = [{"arch": "cnn_tiny"}, {"arch": "cnn_tiny", "arch_kwargs": {"widths": [8, 16]}}]
SEARCH = {
    **LEARNING_SPEC,
    "name": "search",
    "search": {"student": STUDENTS, "prune.amount": [0, 0.3], "quantize.method": [None]},
    "gates": {"max_accuracy_drop": 0.15},
}


def test_a_search_through_serve_hands_over_its_front_and_its_choice(served, tmp_path):
    url, key, _ = served
    path = tmp_path / "search.json"
    path.write_text(json.dumps(SEARCH))
    env = {"DISTILLERY_URL": url, "DISTILLERY_API_KEY": key, "COLUMNS": "200"}
    proc = cli("submit", str(path), "--wait", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out, err)
    assert "search: 4 candidates" in err
    job_id = next(line.split()[0] for line in out.splitlines() if line.startswith("job_"))
    assert "4 candidates: * on the Pareto front, >> the final model" in out
    assert ">>" in out and "gate final.accuracy_drop<=0.15:" in out

    with client(url, key) as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
        candidates = c.get(f"/v1/jobs/{job_id}/candidates").json()["data"]
        listed = [j["id"] for j in c.get("/v1/jobs", params={"limit": 200}).json()["data"]]
        artifacts = {a["name"]: a for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
        front = [cand for cand in candidates if cand["on_front"]]
        bodies = {n: c.get(artifacts[n]["url"]).content for n in artifacts}
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert [s["name"] for s in job["stages"]] == ["teacher", "search", "export"]
    assert all(s["status"] == "succeeded" for s in job["stages"])
    assert [b["branch"] for b in job["branches"]] == [0, 1]
    assert all(b["status"] == "succeeded" for b in job["branches"])
    assert job_id in listed and not {b["id"] for b in job["branches"]} & set(listed)
    assert sorted(c["key"] for c in candidates) == [
        "s0-d0-p0-q0", "s0-d0-p1-q0", "s1-d0-p0-q0", "s1-d0-p1-q0"
    ]  # fmt: skip
    finals = [c for c in candidates if c["final"]]
    assert len(finals) == 1 and job["metrics"]["final"]["model"] == finals[0]["key"]
    assert all(c["gates"] is not None and "accuracy_drop_ci" in c["metrics"] for c in candidates)
    for cand in front:  # every front candidate's model can be downloaded
        assert cand["artifacts"] == [f"candidate-{cand['key']}.onnx"]
    for name, body in bodies.items():
        assert hashlib.sha256(body).hexdigest() == artifacts[name]["sha256"], name
    assert {"candidates.json", "pareto.png", "model.onnx", "report.json"} <= set(artifacts)
    assert json.loads(bodies["candidates.json"]) == json.loads(bodies["report.json"])["candidates"]


def test_impossible_gates_exit_1_and_still_hand_over_a_model(served, tmp_path):
    url, key, _ = served
    spec = {
        **SEARCH,
        "search": {**SEARCH["search"], "student": STUDENTS[1:]},
        "gates": {"min_accuracy": 0.9999},
    }
    path = tmp_path / "impossible.json"
    path.write_text(json.dumps(spec))
    env = {"DISTILLERY_URL": url, "DISTILLERY_API_KEY": key}
    proc = cli("submit", str(path), "--wait", "--json", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    result = json.loads(out.strip().splitlines()[-1])  # JSON lines: the events, then this
    assert result["job"]["status"] == "succeeded" and result["gates_passed"] is False
    (gate,) = result["gates"]
    assert gate["passed"] is False and gate["missed_by"] > 0
    assert "best effort" in result["job"]["metrics"]["final"]["reason"]
    assert sum(c["final"] for c in result["candidates"]) == 1


def test_a_search_through_distillery_run_prints_its_front_and_writes_its_artifacts(tmp_path):
    spec = tmp_path / "search.json"
    spec.write_text(json.dumps(SEARCH))
    out_dir = tmp_path / "out"
    env = {"COLUMNS": "200"}
    proc = cli("run", str(spec), "--out", str(out_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out, err)
    # The display goes to stderr (stdout is --json's).
    assert "4 candidates, objective size: * on the Pareto front, >> the final model" in err
    rows = [line for line in err.splitlines() if line.startswith("│") and "-d0-p" in line]
    assert len(rows) == 4 and sum(">>" in r for r in rows) == 1
    assert "gate final.accuracy_drop<=0.15:" in err
    report = json.loads((out_dir / "report.json").read_text())
    assert json.loads((out_dir / "candidates.json").read_text()) == report["candidates"]
    assert (out_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for cand in report["candidates"]:
        assert (out_dir / f"candidate-{cand['key']}.onnx").exists() == cand["on_front"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # A lost worker is noticed after 15 s without heartbeat: long enough that a busy shared
    # machine does not make a healthy one look lost.
    with running_stack(tmp_path_factory.mktemp("search"), HEARTBEAT_TIMEOUT_SECONDS="15") as s:
        s.start_worker()
        s.start_worker()
        yield s


def _branch_workers(c, job_id: str) -> dict[int, str]:
    job = c.get(f"/v1/jobs/{job_id}").json()
    return {b["branch"]: b["id"] for b in job["branches"]}


def test_branches_fan_out_and_a_lost_worker_reruns_only_its_branch(stack):
    spec = {**SEARCH, "distill": {**SEARCH["distill"], "epochs": 60}}
    with stack.client() as c:
        job = c.post("/v1/jobs", json=spec).json()
        branches = wait_until(lambda: _branch_workers(c, job["id"]) or None, 120, what="branches")
        # Each branch running, on a worker of its own (two idle workers, two messages).
        running = wait_until(
            lambda: (
                all(
                    (b := c.get(f"/v1/jobs/{i}").json())["status"] == "running"
                    for i in branches.values()
                )
                and b
            ),
            120,
            what="both branches running",
        )
        assert running
        owners = {}
        for i, branch_id in branches.items():
            owners[i] = stack.worker_of(branch_id)
        assert len(set(owners.values())) == 2
        # Kill the worker of branch 1 mid-distillation: only that branch runs again.
        stack.kill_worker(owners[1])
        stack.start_worker()
        done = wait_for_status(c, job["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
        assert done["status"] == "succeeded", done["error"]
        attempts = {b["branch"]: b["attempts"] for b in done["branches"]}
        assert attempts == {0: 1, 1: 2}
        assert len(c.get(f"/v1/jobs/{job['id']}/candidates").json()["data"]) == 4


def test_cancelling_a_search_stops_every_branch(stack):
    spec = {**SEARCH, "name": "to-cancel", "distill": {**SEARCH["distill"], "epochs": 500}}
    with stack.client() as c:
        job = c.post("/v1/jobs", json=spec).json()
        branches = wait_until(lambda: _branch_workers(c, job["id"]) or None, 120, what="branches")
        wait_until(
            lambda: any(
                c.get(f"/v1/jobs/{i}").json()["status"] == "running" for i in branches.values()
            ),
            120,
            what="a branch running",
        )
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        done = wait_for_status(c, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
        assert done["status"] == "cancelled"
        assert all(b["status"] == "cancelled" for b in done["branches"])
