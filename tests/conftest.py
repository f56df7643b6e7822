import os
import uuid

import pytest
import redis

from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from app.services import tenants
from tests.service_support import (
    REDIS_URL,
    ThreadServer,
    client,
    postgres_database,
    serving,
)


def pytest_configure(config):
    # Tests run on 2 cores beside workers and databases: one torch thread each, here and in the
    # processes the tests start (they inherit the variable).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("embedded")) as s:
        yield s


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
