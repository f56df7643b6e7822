"""Real processes: `distillery api` + `distillery worker` on PostgreSQL and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

import httpx
import pytest
import redis

from tests.service_support import REDIS_URL, cli, client, free_port, postgres_database, wait_until


class Stack:
    def __init__(self, tmp_path, db_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "dk_e2e_" + uuid.uuid4().hex
        self.queue = f"e2e-{uuid.uuid4().hex[:8]}"
        self.logs = tmp_path
        self.env = {
            "DATABASE_URL": db_url,
            "BROKER_URL": REDIS_URL,
            "DISTILLERY_HOME": str(tmp_path / "home"),
            "STORAGE_DIR": str(tmp_path / "storage"),
            "DISTILLERY_API_KEY": self.key,
            "DEFAULT_QUEUE": self.queue,
            "HEARTBEAT_SECONDS": "0.5",
            "HEARTBEAT_TIMEOUT_SECONDS": "4",
            "REAPER_INTERVAL_SECONDS": "1",
            "MAX_ATTEMPTS": "2",
            "PROGRESS_THROTTLE_SECONDS": "0.2",
            "OMP_NUM_THREADS": "1",
        }
        self.procs: list[subprocess.Popen] = []

    def start_api(self) -> None:
        log = open(self.logs / "api.log", "ab")
        self.procs.append(
            cli("api", "--port", str(self.port), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        )

        def ready():
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, what="the API to be ready")

    def start_worker(self, queue: str | None = None) -> subprocess.Popen:
        name = f"worker-{len(self.procs)}.log"
        log = open(self.logs / name, "ab")
        proc = cli(
            "worker", "-Q", queue or self.queue, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        wait_until(
            lambda: b" ready." in (self.logs / name).read_bytes(), 90, what="the worker to be ready"
        )
        return proc

    def client(self) -> httpx.Client:
        return client(self.url, self.key)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    with postgres_database() as url:
        s = Stack(tmp, url)
        try:
            s.start_api()
            yield s
        finally:
            s.stop()
            r = redis.Redis.from_url(REDIS_URL)
            for key in r.scan_iter(f"{s.queue}*"):
                r.delete(key)


def wait_for_status(c: httpx.Client, job_id: str, statuses: set[str], timeout: float = 180) -> dict:
    def done():
        job = c.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(done, timeout, interval=0.3, what=f"job {job_id} to reach {statuses}")


os.environ.setdefault("OMP_NUM_THREADS", "1")
