"""A background thread that runs the reaper pass (app.jobs.lifecycle.reap) every few seconds.
Runs in API processes and workers alike; passes in parallel are safe. Its owner may give it
chores to do at each pass too (retention: app.services.retention.Retention), each of which
decides for itself whether it is due."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta

from app.core.config import Settings
from app.core.db import Database
from app.jobs import lifecycle
from app.models import utcnow
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
            counts = lifecycle.reap(
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
