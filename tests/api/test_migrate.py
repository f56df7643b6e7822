"""Every API process and worker migrates at start-up, so migrations must be safe to run from
several processes at once (seen failing: `api --workers 2` on a fresh PostgreSQL database,
one process dying on a duplicate CREATE TYPE)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.service_support import REPO, postgres_database


def _migrate_at_once(url: str, home, n: int = 4) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "DATABASE_URL": url, "DISTILLERY_HOME": str(home)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "migrate"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(n)
    ]
    return [(p.wait(timeout=120), p.stdout.read()) for p in procs]


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_concurrent_migrations_all_succeed(backend, tmp_path):
    from alembic.script import ScriptDirectory

    from app.core.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    with postgres_database() if backend == "postgresql" else _sqlite(tmp_path) as url:
        results = _migrate_at_once(url, tmp_path / "home")
        for rc, out in results:
            assert rc == 0, out
            assert "database at head" in out
        engine = create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(
                text("SELECT version_num FROM alembic_version")
            ).scalars().all() == [head]
            assert "jobs" in inspect(conn).get_table_names()
        engine.dispose()


class _sqlite:
    def __init__(self, tmp_path) -> None:
        self.url = f"sqlite:///{tmp_path / 'db' / 'distillery.db'}"

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_migrations_build_exactly_the_tables_the_models_describe(backend, tmp_path):
    """Several hands add migrations: head must match app.models, or a column a model uses
    is missing in production (autogenerate's comparison finds nothing to change)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import app.models  # noqa: F401  (the tables)
    from app.core.db import Base
    from app.core.migrate import upgrade

    with postgres_database() if backend == "postgresql" else _sqlite(tmp_path) as url:
        upgrade(url)
        engine = create_engine(url)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        engine.dispose()
    assert diff == []
