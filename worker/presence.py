"""Heartbeats: one per running job (ownership and cancel requests), one per worker process
(the `workers` table readiness reads)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from app.jobs import lifecycle, workers
from worker.runtime import Runtime

log = logging.getLogger("distillery.worker")


def worker_process() -> str:
    """This worker process's name in the `workers` table: what its supervisor (`serve`) knows
    it by, from the outside, to release its jobs when it dies."""
    return workers.worker_name(socket.gethostname(), os.getpid())


def attempt_id() -> str:
    """Who runs one attempt of a job: the process, then a fresh token (every write of the
    attempt is fenced on it, so a stale attempt can change nothing)."""
    return f"{worker_process()}/{uuid.uuid4().hex[:8]}"


class _Beat(threading.Thread):
    def __init__(self, runtime: Runtime, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.runtime = runtime
        self._halt = threading.Event()  # not `_stop`: a method of threading.Thread

    def beat(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._halt.wait(self.runtime.settings.HEARTBEAT_SECONDS):
            try:
                self.beat()
            except Exception:  # the DB blinked: try again next beat; the timeout is generous
                log.warning("%s failed", self.name, exc_info=True)

    def stop(self) -> None:
        self._halt.set()


class JobHeartbeat(_Beat):
    """Beats for a job while it runs; notices cancel requests and lost ownership."""

    def __init__(self, runtime: Runtime, job_id: str, worker_id: str) -> None:
        super().__init__(runtime, f"heartbeat-{job_id}")
        self.job_id, self.worker_id = job_id, worker_id
        self.cancel = threading.Event()
        self.lost = threading.Event()

    def beat(self) -> None:
        with self.runtime.db.session() as s:
            owned, cancel = lifecycle.heartbeat(s, job_id=self.job_id, worker_id=self.worker_id)
        if not owned:
            self.lost.set()
        if cancel:
            self.cancel.set()


class Presence(_Beat):
    """Keeps this process in the `workers` table while it runs; re-registers if someone
    removed the row (the reaper, while the database was unreachable for a while)."""

    def __init__(self, runtime: Runtime, queues: list[str]) -> None:
        super().__init__(runtime, "presence")
        self.queues = queues

    def register(self) -> None:
        with self.runtime.db.session() as s:
            workers.register_worker(
                s,
                worker=worker_process(),
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=self.queues,
            )

    def beat(self) -> None:
        with self.runtime.db.session() as s:
            known = workers.worker_heartbeat(s, worker=worker_process())
        if not known:
            self.register()

    def stop(self) -> None:
        super().stop()
        try:
            with self.runtime.db.session() as s:
                workers.forget_worker(s, worker=worker_process())
        except Exception:
            log.warning("could not deregister this worker", exc_info=True)
