"""Run Alembic migrations programmatically (`distillery migrate`, and at API/worker start)."""

from __future__ import annotations

import fcntl
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).resolve().parents[1] / "migrations"  # shipped inside the package


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to `revision`; safe to call from several processes at once (each API process
    and worker does at start-up). PostgreSQL serialises them with an advisory lock (in
    migrations/env.py); a SQLite file, which has no such lock, with a lock file beside it."""
    db = make_url(url)
    if db.get_backend_name() != "sqlite" or db.database in (None, "", ":memory:"):
        command.upgrade(alembic_config(url), revision)
        return
    lock_path = Path(db.database).with_name(Path(db.database).name + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            command.upgrade(alembic_config(url), revision)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
