"""Job event streams, fed from one reader per API process.

Each open `GET /v1/jobs/{id}/events` subscribes here and waits on its own in-memory queue;
it holds no database connection and no thread. One feed task reads the new events of every
subscribed job in one query and hands each stream its job's events. It looks when woken:
on PostgreSQL by NOTIFY (a trigger on job_events, migration 0007) through one listening
connection, and anyway every EVENTS_FALLBACK_SECONDS; on SQLite every EVENTS_POLL_SECONDS
while a stream is open. A new stream first reads its backlog itself (in pages), then joins.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.core.config import Settings
from app.core.db import Database
from app.core.errors import Unauthorized
from app.jobs.states import TERMINAL
from app.services import jobs as jobs_service
from app.services import tenants

log = logging.getLogger("distillery.events")

CHANNEL = "distillery_job_events"  # the trigger of migration 0007 notifies here
PAGE = 500
MAX_QUEUED = 2000  # a stream this far behind reads from the database again
FEED_THREADS = 4  # backlogs of streams opening at once, and the feed's own reads (see PoolSize)


class Marker(enum.Enum):
    HEARTBEAT = "heartbeat"  # nothing new for a while: a comment keeps proxies from closing


HEARTBEAT = Marker.HEARTBEAT


@dataclass(frozen=True)
class Ended:
    """The job has ended with `status`: the stream closes (its terminal event came first)."""

    status: str | None


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]

    @property
    def ends(self) -> bool:
        return self.type == "status" and self.data.get("status") in TERMINAL


@dataclass(eq=False)
class Subscriber:
    job_id: str
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    lagging: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: Event) -> None:
        if self.queue.qsize() >= MAX_QUEUED:
            self.lagging = True  # dropped: the stream re-reads from its own cursor
        else:
            self.queue.put_nowait(event)
        self.wake.set()


def _event(row) -> Event:
    return Event(row.id, row.type, {**row.data, "at": row.created_at.isoformat()})


def _page(s, job_id: str, after: int, status: str | None) -> tuple[list[Event], str | None]:
    """The events after `after` and the job's `status`, read before them: a terminal status
    was committed with its status event, so the page holds that event (read after the page,
    a job that ended in between would end the stream without its last events)."""
    rows = jobs_service.events_after(s, job_id=job_id, after_id=after, limit=PAGE)
    return [_event(r) for r in rows], status


class EventFeed:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.cursors: dict[str, int] = {}  # per job: the last event id the feed has read
        self.postgres = db.engine.dialect.name == "postgresql"
        # Its own thread: the feed never queues behind the requests' thread pool.
        self.executor = ThreadPoolExecutor(
            max_workers=FEED_THREADS, thread_name_prefix="event-feed"
        )
        self.task: asyncio.Task | None = None
        self.stopping = threading.Event()
        self.listener: threading.Thread | None = None

    # --- what a stream does -------------------------------------------------------------------

    async def run_db(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def backlog(self, job_id: str, after: int) -> tuple[list[Event], str | None]:
        with self.db.session() as s:
            return _page(s, job_id, after, jobs_service.job_status(s, job_id=job_id))

    async def open(self, *, key: str, job_id: str, after: int) -> tuple[str, Stream]:
        """Subscribe to the job's events after `after`: the caller's key is checked, the job
        found to be its tenant's (else Unauthorized / JobNotFound) and the first page read in
        one trip to the database, a few streams at a time (the threads of hundreds opening
        at once took the event loop's share of the interpreter: /healthz waited). Returns the
        tenant's id and the stream; iterate it, and `close()` it when done (idempotent)."""
        sub = Subscriber(job_id)
        self.subscribers.setdefault(job_id, set()).add(sub)  # before the backlog: no gap
        try:
            async with self.opening:
                tenant_id, *first = await self.run_db(self.first_page, key, job_id, after)
        except BaseException:
            self.leave(sub)
            raise
        return tenant_id, Stream(self, sub, self._events(sub, after, tuple(first)))

    def first_page(self, key: str, job_id: str, after: int) -> tuple[str, list[Event], str | None]:
        """Three light queries in one session: the key, the job's status (404 for another
        tenant's job; its row, spec and metrics are not loaded) and the first page. Each
        stream opening costs the interpreter this much, on a thread beside the event loop."""
        with self.db.session() as s:
            tenant = tenants.authenticate(s, key=key)
            if tenant is None:
                raise Unauthorized(
                    "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"}
                )
            status = jobs_service.owned_job_status(s, tenant_id=tenant.id, job_id=job_id)
            return tenant.id, *_page(s, job_id, after, status)

    async def _events(
        self, sub: Subscriber, after: int, page: tuple[list[Event], str | None]
    ) -> AsyncIterator[Event | Ended | Marker]:
        cursor = after
        while True:
            events, status = page
            for ev in events:
                cursor = ev.id
                yield ev
            if len(events) < PAGE:
                break
            page = await self.run_db(self.backlog, sub.job_id, cursor)
        ended = next((ev for ev in reversed(events) if ev.ends), None)
        if ended is not None or status in TERMINAL:
            yield Ended(ended.data["status"] if ended else status)
            return
        async for item in self._live(sub, cursor):
            yield item

    async def _live(self, sub: Subscriber, cursor: int) -> AsyncIterator[Event | Marker]:
        self._join(sub, cursor)
        while True:
            try:
                await asyncio.wait_for(sub.wake.wait(), self.settings.EVENTS_HEARTBEAT_SECONDS)
            except TimeoutError:
                yield HEARTBEAT
                continue
            sub.wake.clear()
            if sub.lagging:  # too far behind: read what was dropped from the database
                sub.lagging = False
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                events, _ = await self.run_db(self.backlog, sub.job_id, cursor)
                for ev in events:
                    cursor = ev.id
                    yield ev
                    if ev.ends:
                        yield Ended(ev.data["status"])
                        return
                sub.lagging = len(events) == PAGE
                if sub.lagging:
                    sub.wake.set()
                continue
            while not sub.queue.empty():
                ev = sub.queue.get_nowait()
                if ev.id <= cursor:
                    continue
                cursor = ev.id
                yield ev
                if ev.ends:
                    yield Ended(ev.data["status"])
                    return

    def _join(self, sub: Subscriber, cursor: int) -> None:
        # A job no other stream follows is read from this stream's cursor on. One that
        # another stream follows keeps the feed's cursor: every event the feed read since
        # this stream subscribed (before its backlog) is in its queue already.
        self.cursors.setdefault(sub.job_id, cursor)
        self.poke()

    def leave(self, sub: Subscriber) -> None:
        subs = self.subscribers.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.subscribers[sub.job_id]
                self.cursors.pop(sub.job_id, None)

    # --- the feed -----------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.opening = asyncio.Semaphore(FEED_THREADS)
        self.woken = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="event-feed")
        if self.postgres:
            self.listener = threading.Thread(target=self._listen, name="event-listen", daemon=True)
            self.listener.start()

    async def stop(self) -> None:
        self.stopping.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.listener is not None:
            self.listener.join(timeout=5)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def poke(self) -> None:
        if self.task is not None:
            self.woken.set()

    async def _run(self) -> None:
        interval = (
            self.settings.EVENTS_FALLBACK_SECONDS
            if self.postgres
            else self.settings.EVENTS_POLL_SECONDS
        )
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.woken.wait(), timeout=interval)
            self.woken.clear()
            try:
                await self._read_once()
            except Exception:
                log.warning("event feed: reading new events failed", exc_info=True)
                await asyncio.sleep(1)

    async def _read_once(self) -> None:
        cursors = {job: c for job, c in self.cursors.items() if job in self.subscribers}
        if not cursors:
            return
        events = await self.run_db(self._fetch, cursors)
        for job_id, ev in events:
            if ev.id > self.cursors.get(job_id, ev.id):
                self.cursors[job_id] = ev.id
            for sub in self.subscribers.get(job_id, ()):
                sub.offer(ev)
        if len(events) >= 5000:
            self.woken.set()  # more to read

    def _fetch(self, cursors: dict[str, int]) -> list[tuple[str, Event]]:
        with self.db.session() as s:
            rows = jobs_service.events_of_jobs(s, cursors=cursors)
            return [(r.job_id, _event(r)) for r in rows]

    def _listen(self) -> None:
        """On PostgreSQL: one connection LISTENs and wakes the feed on each notification."""
        import psycopg  # the PostgreSQL driver; only the distributed mode has it in use

        conninfo = self.db.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        while not self.stopping.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.loop.call_soon_threadsafe(self.poke)  # catch up after (re)connecting
                    while not self.stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload in self.cursors:
                                self.loop.call_soon_threadsafe(self.poke)
            except Exception:
                log.warning("event feed: LISTEN connection lost; reconnecting", exc_info=True)
                self.stopping.wait(1.0)


class Stream:
    """One open stream's events: iterate it; close() unsubscribes, also when it never ran."""

    def __init__(
        self, feed: EventFeed, sub: Subscriber, items: AsyncIterator[Event | Ended | Marker]
    ) -> None:
        self.feed, self.sub, self.items = feed, sub, items

    def __aiter__(self) -> AsyncIterator[Event | Ended | Marker]:
        return self.items

    def close(self) -> None:
        self.feed.leave(self.sub)

    async def aclose(self) -> None:
        """`close()` for a BackgroundTask: a sync one would take a thread from the requests'
        pool at the end of every stream (500 streams ending at once queued behind them)."""
        self.close()
