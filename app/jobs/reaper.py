"""A background thread that runs the reaper pass (app.jobs.lifecycle.reap) every few seconds.
Runs in API processes and workers alike; passes in parallel are safe. With a retention TTL
set it also runs retention (app.services.retention), one reaper of them all at a time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from app.core.config import Settings
from app.core.db import Database
from app.core.storage import Storage
from app.jobs import lifecycle
from app.models import utcnow
from app.services import retention
from app.webhooks import outbox

log = logging.getLogger("distillery.reaper")


class Reaper(threading.Thread):
    def __init__(
        self,
        database: Database,
        settings: Settings,
        enqueue: Callable[[str, str], None],
        queue_size: Callable[[str], int | None] | None = None,
        storage: Storage | None = None,  # None: no retention here
    ) -> None:
        super().__init__(daemon=True, name="reaper")
        self.database, self.settings, self.storage = database, settings, storage
        self.enqueue, self.queue_size = enqueue, queue_size
        self._stop = threading.Event()

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
        return counts | self.run_retention()

    def run_retention(self) -> dict[str, int]:
        """Retention's pass, when a TTL is set and it is this reaper's turn (at most every
        RETENTION_INTERVAL_SECONDS over all processes; sooner while a backlog remains)."""
        s = self.settings
        if self.storage is None or (s.ARTIFACT_TTL_DAYS is None and s.UPLOAD_TTL_DAYS is None):
            return {}
        with self.database.session() as session:
            if not retention.claim_turn(session, every=s.RETENTION_INTERVAL_SECONDS):
                return {}
        done = retention.sweep(
            self.database,
            self.storage,
            artifact_ttl_days=s.ARTIFACT_TTL_DAYS,
            upload_ttl_days=s.UPLOAD_TTL_DAYS,
            limit=s.RETENTION_BATCH,
        )
        if done.more:
            with self.database.session() as session:
                retention.next_turn_soon(session)
        return {"expired_jobs": len(done.jobs), "expired_uploads": len(done.uploads)}

    def run(self) -> None:
        while not self._stop.wait(self.settings.REAPER_INTERVAL_SECONDS):
            try:
                counts = self.run_once()
                if any(counts.values()):
                    log.info("reaper: %s", counts)
            except Exception:
                log.warning("reaper pass failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
