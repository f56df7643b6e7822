import os
import signal
import subprocess
import uuid

import httpx
import pytest
import redis

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.services import tenants
from tests.service_support import (
    REDIS_URL,
    ThreadServer,
    cli,
    client,
    free_port,
    postgres_database,
    wait_until,
)


def pytest_configure(config):
    # Tests run on 2 cores beside workers and databases: one torch thread each, here and in the
    # processes the tests start (they inherit the variable).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("embedded")
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


# --- a live API without workers (uvicorn in a thread, real HTTP), on SQLite and PostgreSQL ---
# Jobs stay queued; their messages go to each mode's real broker on a throwaway queue.


class Api:
    def __init__(self, url: str, settings: Settings, db: Database) -> None:
        self.url, self.settings, self.db = url, settings, db
        self.keys: dict[str, str] = {}

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            with self.db.session() as s:
                self.keys[tenant] = tenants.create_key(s, tenant_name=tenant)
        return self.keys[tenant]

    def client(self, tenant: str | None = "alice"):
        return client(self.url, self.key(tenant) if tenant else None)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def api(request, tmp_path_factory):
    home = tmp_path_factory.mktemp(f"home-{request.param}")
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = {"DISTILLERY_HOME": home, "DEFAULT_QUEUE": queue, "REAPER_INTERVAL_SECONDS": 3600}
    if request.param == "postgres":
        with postgres_database() as url:
            settings = Settings(**env, DATABASE_URL=url, BROKER_URL=REDIS_URL)
            yield from _serve(settings)
        redis.Redis.from_url(REDIS_URL).delete(queue)
    else:
        yield from _serve(Settings(**env))


def _serve(settings: Settings):
    app = create_app(settings)
    with ThreadServer(app) as server:
        yield Api(server.url, settings, app.state.db)
