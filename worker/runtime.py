"""What a worker process works with, built from Settings once per process: the database and
the store. Tasks get it from their Celery app (`runtime_of`), never from a module global."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from celery import Celery

from app.core.config import Settings
from app.core.db import Database
from app.core.storage import Storage, open_storage

if TYPE_CHECKING:
    from worker.jobfolder import JobFolder

log = logging.getLogger("distillery.worker")
T = TypeVar("T")


@dataclass
class Runtime:
    settings: Settings
    db: Database
    storage: Storage

    @classmethod
    def from_settings(cls, settings: Settings, *, db_info: dict | None = None) -> Runtime:
        db = Database(settings.database_url, info=db_info)
        return cls(settings, db, open_storage(settings))

    def job_folder(self, job_id: str, *, at: str | None = None) -> JobFolder:
        """Job `job_id`'s folder on this worker (worker/jobfolder.py)."""
        from worker.jobfolder import job_folder

        sync = self.settings.CHECKPOINT_SYNC_SECONDS
        return job_folder(self.storage, self.settings.work_dir, job_id, sync_every=sync, at=at)


def runtime_of(app: Celery) -> Runtime:
    """The runtime of the worker that runs `app` (made by worker.celery_app.make_celery):
    its sessions send the webhook deliveries their job changes record."""
    from app.webhooks.outbox import SEND_WEBHOOK
    from worker.celery_app import make_send_webhook

    runtime = getattr(app, "distillery_runtime", None)
    if runtime is None:
        runtime = app.distillery_runtime = Runtime.from_settings(
            app.distillery_settings, db_info={SEND_WEBHOOK: make_send_webhook(app)}
        )
    return runtime


def retry_db(fn: Callable[[], T], *, what: str, attempts: int = 30, delay: float = 2.0) -> T:
    """Run a DB write, riding out a database that is briefly unreachable: the work it records
    took minutes to hours and must not be lost to a blip."""
    from sqlalchemy.exc import DBAPIError

    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except DBAPIError:
            if attempt == attempts:
                raise
            log.warning("database unavailable while %s; retry %d/%d", what, attempt, attempts - 1)
            time.sleep(delay)
    raise AssertionError("unreachable")
