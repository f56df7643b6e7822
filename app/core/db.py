"""Engine and sessions. SQLite (embedded) and PostgreSQL (distributed) through one code path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker


class Base(DeclarativeBase):
    pass


@dataclass(frozen=True)
class PoolSize:
    """Connections a process may hold: `size` kept open, `overflow` more opened when busy, and
    how long a checkout waits before `sqlalchemy.exc.TimeoutError` (a 503 at the API)."""

    size: int = 10
    overflow: int = 20
    timeout: float = 30.0

    @classmethod
    def for_threads(cls, threads: int, *, timeout: float) -> PoolSize:
        # A request holds a connection only while it runs on one of `threads` threads
        # (app/api/deps.py), so that many connections, plus a few for the process's own
        # background work (reaper, readiness, event feed), never make a thread wait for one.
        size = min(threads, 10)
        return cls(size=size, overflow=threads + 5 - size, timeout=timeout)


def make_engine(url: str, pool: PoolSize | None = None) -> Engine:
    pool = pool or PoolSize()
    sizes = {"pool_size": pool.size, "max_overflow": pool.overflow, "pool_timeout": pool.timeout}
    if url.startswith("sqlite"):
        # Several processes (API, worker) share the file: WAL lets readers run beside the
        # writer, busy_timeout makes a writer wait instead of failing at once.
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **sizes
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **sizes)


class Database:
    def __init__(
        self, url: str, *, info: dict[str, Any] | None = None, pool: PoolSize | None = None
    ) -> None:
        """`info` lands in every session's `Session.info`: what a process gives the code that
        writes through it, e.g. how to send a webhook's task once a change has committed."""
        self.url = url
        self.info = dict(info or {})
        self.engine = make_engine(url, pool)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False, info=self.info)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits when the block ends, rolls back on error."""
        session = self.sessionmaker()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def insert_if_absent(session: Session, model: type[Base], values: dict, unique: list[str]) -> bool:
    """INSERT … ON CONFLICT (`unique`) DO NOTHING: True if this call inserted the row.

    The race-free way to create a row two requests (or processes) may create at once, with
    no savepoint: on SQLite, whose Python driver begins a transaction only at the first write,
    a savepoint opened before any write is the outermost transaction, and releasing it commits
    everything so far (a later rollback then undoes nothing)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    table = model.__table__
    stmt = (
        insert(table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=unique)
        # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING.
        .returning(*table.primary_key.columns)
    )
    return session.execute(stmt).first() is not None


# --- work to do once a transaction has committed ------------------------------------------


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's transaction has committed (never before, never on
    rollback): a message must not reference a row that is not there yet.

    It runs when the transaction has ended and given its connection back to the pool, not in
    SQLAlchemy's after_commit hook, which fires while the connection is still checked out: a
    callback that writes through the engine would then hold two connections per request, and
    a burst of submissions as large as the pool waits on itself until the pool times out."""
    session.info.setdefault("after_commit", []).append(callback)


@event.listens_for(Session, "after_commit")
def _commit_callbacks(session: Session) -> None:
    if not session.in_nested_transaction():  # a released savepoint commits nothing yet
        session.info["committed"] = session.info.pop("after_commit", [])


@event.listens_for(Session, "after_transaction_end")
def _run_committed_callbacks(session: Session, transaction) -> None:
    if transaction.parent is None:  # the root: its connection is back in the pool
        session.info.pop("after_commit", None)  # it ended without a commit: never run these
        for callback in session.info.pop("committed", []):
            callback()
