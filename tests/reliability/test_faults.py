"""Faults with real processes: killed workers, a restarted broker, a restarted API, an
unreachable database, a diverging job. Nothing is lost and nothing is left `running`."""

from __future__ import annotations

import hashlib
import select
import signal
import socket
import subprocess
import threading
from contextlib import contextmanager, suppress

import pytest
import torch

from app.client import Client
from tests.service_support import (
    TINY_ARTIFACTS,
    TINY_SPEC,
    a_job_whose_workers_die,
    free_port,
    postgres_database,
    running_stack,
    sse_events,
    wait_for_status,
    wait_until,
)

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("faults")) as s:
        yield s


def test_a_killed_worker_job_resumes_on_another_and_finishes_once(stack):
    """SIGKILL mid-distillation: the heartbeat stops, the reaper re-queues, a new worker
    resumes after the last finished stage and epoch; one set of artifacts."""
    queue = stack.queue + "-kill"
    first = stack.start_worker(queue)
    spec = {**TINY_SPEC, "queue": queue, "distill": {"epochs": 300}}
    with stack.client() as c:
        job = c.post("/v1/jobs", json=spec).json()
        ckpt = stack.job_dir(job["id"]) / ".work/checkpoints/distill/distill.pt"
        wait_until(ckpt.exists, 120, what="a distill epoch checkpointed")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        requeued = wait_for_status(c, job["id"], {"queued"}, timeout=60)
        assert requeued["attempts"] == 1
        stack.start_worker(queue)
        done = wait_for_status(c, job["id"], {"succeeded", "failed"}, timeout=300)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        events = sse_events(c, job["id"])
        assert [d["status"] for k, d in events if k == "status"] == [
            "queued",
            "running",
            "queued",
            "running",
            "succeeded",
        ]
        assert [d["stage"] for k, d in events if k == "stage" and d.get("resumed")] == [
            "teacher",
            "baseline",
        ]
        assert any(k == "log" and "resumed distill after epoch" in d["message"] for k, d in events)
        names = [a["name"] for a in c.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]]
        assert len(names) == len(set(names)) and set(names) == TINY_ARTIFACTS
        # One history row per epoch, though the attempts overlapped on the distill stage.
        history = c.get(f"/v1/jobs/{job['id']}/history").json()["data"]
        assert [(r["run"], r["epoch"]) for r in history] == [
            *(("teacher", k) for k in (1, 2)),
            *((run, k) for run in ("baseline", "distill") for k in range(1, 301)),
            ("finetune1", 1),
        ]


def test_a_job_whose_worker_never_comes_back_fails_as_worker_lost(stack):
    with stack.client() as c:
        job_id = a_job_whose_workers_die(stack, c, attempts=2)  # MAX_ATTEMPTS=2 here
        # The reaper fails it (HEARTBEAT_TIMEOUT_SECONDS=10, a pass each second); how soon
        # after the kill is measured by `python -m bench --only recovery`.
        done = wait_for_status(c, job_id, {"failed", "succeeded", "cancelled"}, timeout=120)
        assert done["status"] == "failed" and done["attempts"] == 2  # MAX_ATTEMPTS, no third
        assert done["error"]["code"] == "worker_lost" and done["finished_at"] is not None


def test_a_diverging_job_fails_with_nan_loss(stack, tmp_path):
    from worker.pipeline.archs import build_model
    from worker.pipeline.export import export_onnx

    stack.start_worker(stack.queue + "-nan")
    teacher = build_model("cnn_tiny", (1, 8, 8), 10).eval()
    with torch.no_grad():
        teacher.classifier.bias.fill_(float("nan"))  # logits are NaN: the KD loss is too
    path = export_onnx(teacher, torch.zeros(1, 1, 8, 8), tmp_path / "nan.onnx")
    with stack.client() as c:
        model = c.post("/v1/models", files={"file": ("nan.onnx", path.read_bytes())}).json()
        spec = {
            **TINY_SPEC,
            "queue": stack.queue + "-nan",
            "teacher": {"source": "upload", "id": model["id"]},
        }
        job = c.post("/v1/jobs", json=spec).json()
        done = wait_for_status(c, job["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "nan_loss"
    assert "loss became nan" in done["error"]["message"]
    assert {s["name"]: s["status"] for s in done["stages"]}["distill"] == "failed"


def test_the_api_restarted_while_jobs_run_and_a_download_streams(stack, tmp_path):
    """Jobs carry on without the API; a download cut by the API's death resumes with Range
    once a new API is up, and ends with the right sha256."""
    queue = stack.queue + "-api"
    stack.start_worker(queue)
    big = {
        **TINY_SPEC,
        "queue": queue,
        "student": {"arch": "resnet18"},
        "prune": None,
        "quantize": None,
        "export": ["onnx"],
        "distill": {"epochs": 1},
    }
    with stack.client() as c:
        job = c.post("/v1/jobs", json=big).json()
        done = wait_for_status(c, job["id"], {"succeeded", "failed"}, timeout=240)
        assert done["status"] == "succeeded", done["error"]
        artifact = next(
            a
            for a in c.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
            if a["name"] == "model.onnx"
        )
        assert artifact["bytes"] > 20_000_000  # big enough not to sit whole in socket buffers
        slow = c.post(
            "/v1/jobs", json={**TINY_SPEC, "queue": queue, "distill": {"epochs": 200}}
        ).json()
        wait_for_status(c, slow["id"], {"running"}, timeout=60)

    killed = []

    def on_progress(done_bytes, total):
        if not killed:
            killed.append(done_bytes)
            stack.kill_api()  # mid-stream
            threading.Thread(target=stack.start_api, daemon=True).start()

    with Client(stack.url, stack.key, retries=8, backoff=1.0) as client:
        path = client.download(job["id"], "model.onnx", tmp_path, on_progress=on_progress)
    assert killed and killed[0] < artifact["bytes"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact["sha256"]
    with stack.client() as c:  # the job that ran through the restart finished normally
        done = wait_for_status(c, slow["id"], {"succeeded", "failed"}, timeout=240)
        assert done["status"] == "succeeded" and done["attempts"] == 1


# --- a broker restart ------------------------------------------------------------------------


@contextmanager
def private_redis(tmp_path):
    """A Redis of our own (no persistence, like the machine's) that a test may restart."""
    port = free_port()
    cmd = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(tmp_path),
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL)]

    def up():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def restart():
        procs[-1].kill()
        procs[-1].wait(timeout=10)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        wait_until(up, 20, what="redis to come back")

    wait_until(up, 20, what="redis")
    try:
        yield f"redis://127.0.0.1:{port}/0", restart
    finally:
        procs[-1].kill()


def test_a_redis_restart_loses_no_job(tmp_path):
    """The running job finishes; the queued job whose message died with Redis is sent again
    by the reaper (its queue is empty while the DB says it waits) and runs once."""
    with (
        private_redis(tmp_path) as (url, restart_redis),
        running_stack(tmp_path, broker_url=url, RESEND_AFTER_SECONDS="3") as stack,
    ):
        stack.start_worker()
        with stack.client() as c:
            running = c.post("/v1/jobs", json={**TINY_SPEC, "distill": {"epochs": 150}}).json()
            wait_until(
                lambda: c.get(f"/v1/jobs/{running['id']}").json()["stage"] == "distill",
                120,
                what="distill",
            )
            queued = c.post("/v1/jobs", json=TINY_SPEC).json()
            assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
            restart_redis()
            first = wait_for_status(c, running["id"], {"succeeded", "failed"}, timeout=240)
            second = wait_for_status(c, queued["id"], {"succeeded", "failed"}, timeout=240)
        assert first["status"] == "succeeded" and first["attempts"] == 1
        assert second["status"] == "succeeded" and second["attempts"] == 1


# --- the database out of reach ---------------------------------------------------------------


class TcpProxy:
    """Forwards a local port to PostgreSQL; `cut()` drops every connection and refuses new
    ones until `restore()`: the database out of reach, for real, from the service's side."""

    def __init__(self, target_port: int = 5432) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.blocked = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def cut(self) -> None:
        self.blocked.set()
        with self.lock:
            for s in self.conns:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.conns.clear()

    def restore(self) -> None:
        self.blocked.clear()


def test_the_database_briefly_unreachable(tmp_path):
    """At the API: 503 with Retry-After (never a 500) while it is gone, normal service after.
    At the worker: the job that finished during the outage is recorded once it is back."""
    with postgres_database() as url:
        proxy = TcpProxy()
        proxied = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        with running_stack(tmp_path, db_url=proxied, HEARTBEAT_TIMEOUT_SECONDS="60") as stack:
            stack.start_worker()
            with stack.client() as c:
                job = c.post("/v1/jobs", json=TINY_SPEC).json()
                wait_for_status(c, job["id"], {"running"}, timeout=60)
                proxy.cut()
                try:
                    for method, path in (
                        ("GET", f"/v1/jobs/{job['id']}"),
                        ("GET", "/v1/jobs"),
                        ("POST", "/v1/jobs"),
                    ):
                        r = c.request(method, path, json=TINY_SPEC if method == "POST" else None)
                        assert r.status_code == 503, (path, r.text)
                        assert r.headers["Retry-After"] == "5"
                        assert r.json()["error"]["code"] == "database_unavailable"
                    assert c.get("/healthz").status_code == 200
                    assert c.get("/readyz").status_code == 503
                    # The tiny job ends while the database is away: its worker retries the write.
                    wait_until(
                        lambda: f"recording the end of {job['id']}" in stack.worker_logs(),
                        120,
                        what="the job to end while the database is away",
                    )
                finally:
                    proxy.restore()
                done = wait_for_status(c, job["id"], {"succeeded", "failed"}, timeout=120)
                assert done["status"] == "succeeded", done["error"]
                assert all(s["status"] == "succeeded" for s in done["stages"])
                names = {a["name"] for a in c.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
                assert names == TINY_ARTIFACTS
                # The rows written while the database was away were kept and stored after.
                history = c.get(f"/v1/jobs/{job['id']}/history").json()["data"]
                assert [r["run"] for r in history] == ["teacher"] * 2 + [
                    "baseline",
                    "baseline",
                    "distill",
                    "distill",
                    "finetune1",
                ]
                assert c.get("/readyz").status_code == 200
