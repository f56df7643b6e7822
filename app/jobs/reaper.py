"""The reaper: its pass (`reap`: jobs whose worker went silent, messages that never went out
or that the broker lost) and the background thread that runs it every few seconds. Runs in
API processes and workers alike; passes in parallel are safe. Its owner may give it
chores to do at each pass too (retention: app.services.retention.Retention), each of which
decides for itself whether it is due."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database
from app.jobs import lifecycle, search, workers
from app.jobs.lifecycle import Enqueue
from app.jobs.states import ACTIVE, JobStatus
from app.models import Job, utcnow
from app.webhooks import outbox

log = logging.getLogger("distillery.reaper")


class Reaper(threading.Thread):
    def __init__(
        self,
        database: Database,
        settings: Settings,
        enqueue: Callable[[str, str], None],
        queue_size: Callable[[str], int | None] | None = None,
        chores: Sequence[Callable[[], dict[str, int]]] = (),
    ) -> None:
        super().__init__(daemon=True, name="reaper")
        self.database, self.settings = database, settings
        self.enqueue, self.queue_size = enqueue, queue_size
        self.chores = list(chores)  # given, not imported: they live above app/jobs
        # Not `_stop`: threading.Thread has a method of that name, which join() and the
        # child of a fork call (an Event there made both raise TypeError).
        self._halt = threading.Event()

    def run_once(self) -> dict[str, int]:
        with self.database.session() as s:
            counts = reap(
                s,
                heartbeat_timeout=self.settings.HEARTBEAT_TIMEOUT_SECONDS,
                max_attempts=self.settings.MAX_ATTEMPTS,
                enqueue=self.enqueue,
                queue_size=self.queue_size,
                resend_after=self.settings.RESEND_AFTER_SECONDS,
            )
        with self.database.session() as s:
            # Webhook deliveries overdue by RESEND_AFTER_SECONDS lost their task: send again.
            older = utcnow() - timedelta(seconds=self.settings.RESEND_AFTER_SECONDS)
            counts["webhooks"] = len(outbox.resend_lost(s, older_than=older))
        for chore in self.chores:
            try:  # one failing chore costs neither the reaping above nor the others
                counts |= chore()
            except Exception:
                log.warning("reaper chore %r failed", chore, exc_info=True)
        return counts

    def run(self) -> None:
        while not self._halt.wait(self.settings.REAPER_INTERVAL_SECONDS):
            try:
                counts = self.run_once()
                if any(counts.values()):
                    log.info("reaper: %s", counts)
            except Exception:
                log.warning("reaper pass failed", exc_info=True)

    def stop(self) -> None:
        self._halt.set()


def reap(
    session: Session,
    *,
    heartbeat_timeout: float,
    max_attempts: int,
    enqueue: Enqueue,
    queue_size: Callable[[str], int | None] | None = None,
    resend_after: float = 60.0,
) -> dict[str, int]:
    """One reaper pass; safe to run in many processes at once (rows are locked and skipped).

    - running/cancelling with no heartbeat for `heartbeat_timeout`: released (see `release`);
    - worker processes as silent: forgotten;
    - queued whose message never went out (broker was down at submit): sent now;
    - queued whose message went out more than `resend_after` ago while the broker's queue is
      empty (the broker lost it, e.g. a restart without persistence): sent again. A duplicate
      message is harmless: only one worker can claim a job.
    """
    now = utcnow()
    stale = now - timedelta(seconds=heartbeat_timeout)
    counts = {"requeued": 0, "lost": 0, "cancelled": 0, "sent": 0}
    rows = session.scalars(
        select(Job)
        .where(Job.status.in_(ACTIVE), Job.heartbeat_at < stale)
        .with_for_update(skip_locked=True)
        .limit(100)
    ).all()
    reason = f"worker lost (no heartbeat for {heartbeat_timeout:.0f}s)"
    for job in rows:
        counts[
            lifecycle.release(session, job, now=now, max_attempts=max_attempts, reason=reason)
        ] += 1
    workers.forget_silent_workers(session, before=stale)
    cutoff = now - timedelta(seconds=resend_after)
    to_send = _unsent(session) + _lost_messages(session, cutoff, queue_size)
    to_send += _searches_left_waiting(session, cutoff)
    session.flush()
    for job_id, queue in to_send:
        try:
            enqueue(job_id, queue)
        except Exception:
            log.warning("reaper could not enqueue %s; will retry", job_id, exc_info=True)
            break
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))
        counts["sent"] += 1
    return counts


def _searches_left_waiting(session: Session, cutoff: datetime) -> list[tuple[str, str]]:
    """Searches whose branches all ended but that nobody took to finish (the message the last
    branch sent was lost): sent again."""
    waiting = session.scalars(
        select(Job)
        .where(
            Job.status.in_(ACTIVE),
            Job.worker_id.is_(None),
            Job.parent_id.is_(None),
            Job.updated_at < cutoff,
        )
        .limit(100)
    ).all()
    return [(j.id, j.queue) for j in waiting if search.branches_ended(session, job_id=j.id)]


def _unsent(session: Session) -> list[tuple[str, str]]:
    """Queued jobs whose message never went out (the broker was down at submit)."""
    rows = session.scalars(
        select(Job)
        .where(Job.status == JobStatus.QUEUED, Job.enqueued_at.is_(None))
        .with_for_update(skip_locked=True)
        .limit(100)
    ).all()
    return [(j.id, j.queue) for j in rows]


def _lost_messages(
    session: Session, cutoff: datetime, queue_size: Callable[[str], int | None] | None
) -> list[tuple[str, str]]:
    """Queued jobs sent before `cutoff` whose broker queue is empty: the broker lost them."""
    if queue_size is None:
        return []
    waiting = select(Job).where(Job.status == JobStatus.QUEUED, Job.enqueued_at < cutoff)
    out: list[tuple[str, str]] = []
    for queue in session.scalars(waiting.with_only_columns(Job.queue).distinct()).all():
        if queue_size(queue) == 0:
            lost = session.scalars(
                waiting.where(Job.queue == queue).with_for_update(skip_locked=True).limit(100)
            )
            out += [(j.id, j.queue) for j in lost]
    return out
