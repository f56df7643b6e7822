"""Alembic environment: the URL comes from the caller (distillery migrate) or Settings."""

from alembic import context
from sqlalchemy import engine_from_config, pool, text

import app.models  # noqa: F401  (registers the tables on Base.metadata)
from app.core.config import settings
from app.core.db import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or settings.database_url
target_metadata = Base.metadata
MIGRATION_LOCK = 0x44697374  # an arbitrary advisory-lock key of ours ("Dist")


def run_migrations_offline() -> None:
    context.configure(
        url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        connectable = engine_from_config(
            {"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool
        )
        with connectable.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:
    # Batch mode lets ALTERs work on SQLite (copy-and-move), a no-op on PostgreSQL.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # API processes and workers all migrate at start-up: the first to take the lock
            # migrates, the others wait, then find the schema at head (Alembic reads the
            # version table after this, inside run_migrations) and do nothing. Released at commit.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
