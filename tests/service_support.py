"""Shared helpers for service tests: a throwaway PostgreSQL database, a live server, clients."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from app.testing import (  # noqa: F401  (re-exported for the tests)
    PG_ADMIN,
    REDIS_URL,
    TINY_SPEC,
    api_up,
    free_port,
    postgres_database,
)

REPO = Path(__file__).resolve().parents[1]
# What a finished TINY_SPEC job publishes (every stage, default exports).
TINY_ARTIFACTS = {
    "model.onnx",
    "model.int8.onnx",
    "model.torchscript.pt",
    "model.safetensors",
    "model_card.json",
    "history.csv",
    "report.json",
    "profile.json",
}


class ThreadServer:
    """uvicorn serving an app object in a thread: real HTTP on loopback, one process."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def cli(*args: str, env: dict[str, str], cwd: Path = REPO, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args], cwd=cwd, env={**os.environ, **env}, **kw
    )


def run_job(folder: Path, spec: dict) -> dict:
    """`distillery run` of `spec` as a user runs it (a subprocess, `--json`), its output in
    `folder / "out"`: the report. Exit 1 (a gate failed) counts as a run."""
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    proc = cli(
        "run", str(path), "--out", str(folder / "out"), "--json", env={},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 1), err
    return json.loads(out)


def keys_create(home: Path, tenant: str) -> str:
    """A new key of `tenant` made by `distillery keys create` against the embedded database
    of `distillery serve` run with DISTILLERY_HOME=`home`."""
    env = {"DISTILLERY_HOME": str(home), "DATABASE_URL": "", "BROKER_URL": ""}
    made = cli(
        "keys",
        "create",
        "--tenant",
        tenant,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = made.communicate(timeout=120)
    assert made.returncode == 0, stderr
    return stdout.decode().strip()


def post_declaring(
    url: str, path: str, *, key: str, length: int, content_type: str
) -> httpx.Response:
    """POST headers declaring a `length`-byte body, then a single byte of it, and return the
    server's answer: what a server that waits for the whole body never gives."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n{{"
            ).encode()
        )
        reply = b""
        while True:  # until the answer's whole body is in (or the server closes)
            head, sep, body = reply.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            if sep and len(body) >= int(headers.get("content-length", 0)):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Stack:
    """`distillery api` and `distillery worker` processes on PostgreSQL and Redis."""

    def __init__(
        self, tmp_path, db_url: str, broker_url: str = REDIS_URL, **overrides: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "dk_e2e_" + uuid.uuid4().hex
        self.queue = f"e2e-{uuid.uuid4().hex[:8]}"
        self.logs = tmp_path
        self.env = {
            "DATABASE_URL": db_url,
            "BROKER_URL": broker_url,
            "DISTILLERY_HOME": str(tmp_path / "home"),
            "STORAGE_DIR": str(tmp_path / "storage"),
            "DISTILLERY_API_KEY": self.key,
            "DEFAULT_QUEUE": self.queue,
            "JOB_QUEUES": json.dumps([self.queue + "-*"]),  # the tests' own parked queues
            "HEARTBEAT_SECONDS": "0.5",
            # A worker busy in a long GIL-holding call (an ONNX export) on a loaded 2-core
            # machine has missed 4 s of heartbeats here; 10 s still shows the reaper quickly.
            "HEARTBEAT_TIMEOUT_SECONDS": "10",
            "REAPER_INTERVAL_SECONDS": "1",
            "MAX_ATTEMPTS": "2",
            "PROGRESS_THROTTLE_SECONDS": "0.2",
            "OMP_NUM_THREADS": "1",
            **overrides,
        }
        self.broker_url = broker_url
        self.procs: list[subprocess.Popen] = []

    def _on(self, host: Path | None) -> dict:
        """Where a process runs: by default the checkout, sharing DISTILLERY_HOME; on `host`,
        a folder of its own as working directory and home (another machine's disk)."""
        if host is None:
            return {"env": self.env}
        host.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "DISTILLERY_HOME": str(host / "home"), "PYTHONPATH": str(REPO)}
        return {"env": env, "cwd": host}

    def start_api(self, workers: int = 1, host: Path | None = None) -> None:
        log = open(self.logs / "api.log", "ab")
        args = ("api", "--port", str(self.port), "--workers", str(workers))
        self.procs.append(cli(*args, stdout=log, stderr=subprocess.STDOUT, **self._on(host)))

        wait_until(lambda: api_up(self.url), 60, what="the API to answer")

    def start_worker(self, queue: str | None = None, host: Path | None = None) -> subprocess.Popen:
        name = f"worker-{len(self.procs)}.log"
        log = open(self.logs / name, "ab")
        proc = cli(
            "worker",
            "-Q",
            queue or self.queue,
            stdout=log,
            stderr=subprocess.STDOUT,
            **self._on(host),
        )
        self.procs.append(proc)
        wait_until(
            lambda: b" ready." in (self.logs / name).read_bytes(), 90, what="the worker to be ready"
        )
        return proc

    def client(self) -> httpx.Client:
        return client(self.url, self.key)

    def worker_of(self, job_id: str) -> int:
        """The pid of the worker process that holds `job_id` (its worker_id is host:pid/…)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.env["DATABASE_URL"])
        try:
            with engine.connect() as conn:
                owner = conn.execute(
                    text("SELECT worker_id FROM jobs WHERE id = :id"), {"id": job_id}
                ).scalar_one()
        finally:
            engine.dispose()
        return int(owner.split("/")[0].rsplit(":", 1)[1])

    def kill_worker(self, pid: int) -> None:
        proc = next(p for p in self.procs if p.pid == pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def worker_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs.glob("worker-*.log"))

    def job_dir(self, job_id: str) -> Path:
        return self.logs / "storage" / "jobs" / job_id

    def kill_api(self) -> None:
        """SIGKILL the API process(es): no graceful shutdown, connections cut mid-stream."""
        for p in self.procs:
            if p.args[3:4] == ["api"] and p.poll() is None:
                p.kill()
                p.wait(timeout=10)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@contextmanager
def running_stack(
    tmp_path, db_url: str | None = None, api_workers: int = 1, api_host: Path | None = None, **kw
):
    """A Stack with its API started on a fresh PostgreSQL database; stopped and cleaned after."""
    import redis

    with contextlib.ExitStack() as stack:
        url = db_url or stack.enter_context(postgres_database())
        s = Stack(tmp_path, url, **kw)
        try:
            s.start_api(api_workers, api_host)
            yield s
        finally:
            s.stop()
            if s.broker_url.startswith("redis://"):
                r = redis.Redis.from_url(s.broker_url)
                for key in r.scan_iter(f"{s.queue}*"):
                    r.delete(key)


def a_job_whose_workers_die(stack: Stack, c: httpx.Client, attempts: int = 2) -> str:
    """Submit a long job on a queue of its own and SIGKILL its worker on each of its
    `attempts` (the stack's MAX_ATTEMPTS): the reaper then fails it `worker_lost`. Returns
    the job's id once the last worker is dead."""
    queue = stack.queue + "-lost"
    spec = {**TINY_SPEC, "queue": queue, "teacher": {"arch": "cnn_small", "epochs": 500}}
    job_id = c.post("/v1/jobs", json=spec).json()["id"]
    for attempt in range(1, attempts + 1):
        w = stack.start_worker(queue)
        wait_until(
            lambda n=attempt: (
                (j := c.get(f"/v1/jobs/{job_id}").json())["attempts"] == n
                and j["status"] == "running"
            ),
            60,
            what=f"attempt {attempt}",
        )
        w.send_signal(signal.SIGKILL)
        w.wait(timeout=10)
    return job_id


def wait_for_status(c: httpx.Client, job_id: str, statuses: set[str], timeout: float = 180) -> dict:
    def done():
        job = c.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(done, timeout, interval=0.3, what=f"job {job_id} to reach {statuses}")


def sse_events(c: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """A finished job's whole event stream as (type, data) pairs."""
    text = c.get(f"/v1/jobs/{job_id}/events", timeout=120).text
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def assert_no_server_path(message: str, settings) -> None:
    """Neither the service's folders nor any other absolute path appear in `message` (a member
    name climbing out with ../ stays: it is the uploader's own text)."""
    for root in (settings.home, settings.storage_dir):
        assert str(root) not in message, message
    assert not re.search(r"(^|[\s'\"(=])/[\w.-]+/", message), message


def run_cli(served, *args, timeout=300, url=None, key=None, stdin=None, env=None):
    """`distillery ARGS` against the `served` service, as a CI job runs it: stdout and stderr
    piped (not a terminal). Returns (exit code, stdout, stderr)."""
    base, default_key, _ = served
    env = {
        "DISTILLERY_URL": url or base,
        "DISTILLERY_API_KEY": key or default_key,
        "DISTILLERY_HOME": "/nonexistent",
        "GITHUB_STEP_SUMMARY": "",  # even when the suite itself runs in GitHub Actions
        **(env or {}),
    }
    p = cli(
        *args,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = p.communicate(stdin or "", timeout=timeout)
    return p.returncode, out, err


def result_of(out: str) -> dict:
    """`--wait --json` prints the events as JSON lines, then the result: the last line."""
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def serving(home, **env_extra: str):
    """`distillery serve` on the embedded defaults in `home`, with `env_extra` settings:
    (url, key, home)."""
    port = free_port()
    log = open(home / "serve.log", "wb")
    # No DATABASE_URL / BROKER_URL: the embedded defaults. A key is made and printed.
    env = {
        "DISTILLERY_HOME": str(home / "home"),
        "OMP_NUM_THREADS": "1",
        "DATABASE_URL": "",
        "BROKER_URL": "",
        "DISTILLERY_API_KEY": "",
        "STORAGE_DIR": "",
        "JOB_QUEUES": '["parked"]',  # a queue no worker reads (tests/browser)
        # Webhook tests send to a receiver on loopback, over http, retrying fast and briefly.
        "WEBHOOK_ALLOW_HTTP": "true",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "WEBHOOK_RETRY_FOR_SECONDS": "30",
        **env_extra,
    }
    proc = cli("serve", "--port", str(port), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 90, what="distillery serve")
        key = (home / "home" / "api_key").read_text().strip()
        assert f"API key: {key}" in (home / "serve.log").read_text()
        yield url, key, home
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
