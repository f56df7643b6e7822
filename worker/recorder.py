"""Pipeline events -> job rows and job events (what `GET /v1/jobs/{id}` and the SSE stream
show). Progress is throttled; stage changes, metrics, log lines and the training history are
not."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.orm import Session

from app.jobs import lifecycle
from app.jobs.states import StageStatus
from worker.presence import JobHeartbeat
from worker.runtime import Runtime

log = logging.getLogger("distillery.worker")


class Recorder:
    def __init__(self, runtime: Runtime, job_id: str, worker_id: str, hb: JobHeartbeat) -> None:
        self.runtime, self.job_id, self.worker_id, self.hb = runtime, job_id, worker_id, hb
        self._last_progress = 0.0
        self._last_stage = ""
        self._history: list[dict[str, Any]] = []  # rows not stored yet
        self._writers = {
            "progress": self._progress,
            "stage": self._stage,
            "metrics": self._metrics,
            "log": self._log,
        }

    def __call__(self, e: dict[str, Any]) -> None:
        if e["type"] in ("history", "done"):
            if e["type"] == "history":
                self._history.append(e["row"])
            self._store_history()
            return
        write = self._writers.get(e["type"])
        if write is None or self._throttled(e):
            return
        try:
            with self.runtime.db.session() as s:
                write(s, e)
        except Exception:  # a lost progress line is not worth failing a job for
            log.warning("could not record %s event for %s", e["type"], self.job_id, exc_info=True)

    def _store_history(self) -> None:
        """Store the pending rows; rows a database blip held back go with the next row (or at
        the end of the job) instead of being lost."""
        if not self._history:
            return
        try:
            with self.runtime.db.session() as s:
                if not lifecycle.record_history(
                    s, job_id=self.job_id, worker_id=self.worker_id, rows=self._history
                ):
                    self.hb.lost.set()
            self._history = []
        except Exception:
            log.warning("could not record history for %s; retrying", self.job_id, exc_info=True)

    def _throttled(self, e: dict[str, Any]) -> bool:
        """At most one progress write per PROGRESS_THROTTLE_SECONDS within a stage; the end
        of a stage always goes through."""
        if e["type"] != "progress":
            return False
        now = time.monotonic()
        if (
            e.get("stage_progress", 0.0) < 1.0
            and e["stage"] == self._last_stage
            and now - self._last_progress < self.runtime.settings.PROGRESS_THROTTLE_SECONDS
        ):
            return True
        self._last_progress, self._last_stage = now, e["stage"]
        return False

    def _event(self, s: Session, kind: str, data: dict[str, Any]) -> None:
        lifecycle.add_event(s, job_id=self.job_id, type=kind, data=data)

    def _progress(self, s: Session, e: dict[str, Any]) -> None:
        if not lifecycle.set_progress(
            s,
            job_id=self.job_id,
            worker_id=self.worker_id,
            stage=e["stage"],
            progress=e["progress"],
        ):
            self.hb.lost.set()  # another attempt owns the job now
            return
        data = {"stage": e["stage"], "progress": round(e["progress"], 4)}
        if e.get("message"):
            data["message"] = e["message"]
        self._event(s, "progress", data)

    def _stage(self, s: Session, e: dict[str, Any]) -> None:
        status = StageStatus(e["status"])
        fresh = status == StageStatus.SUCCEEDED and not e.get("resumed")
        lifecycle.set_stage(
            s,
            job_id=self.job_id,
            worker_id=self.worker_id,
            name=e["stage"],
            status=status,
            seconds=e.get("seconds"),
            metrics=e.get("metrics") if fresh else None,
        )
        self._event(s, "stage", {k: v for k, v in e.items() if k != "type"})

    def _metrics(self, s: Session, e: dict[str, Any]) -> None:
        lifecycle.set_model_metrics(
            s, job_id=self.job_id, worker_id=self.worker_id, model=e["model"], metrics=e["metrics"]
        )
        self._event(s, "metrics", {"model": e["model"], "metrics": e["metrics"]})

    def _log(self, s: Session, e: dict[str, Any]) -> None:
        self._event(s, "log", {"stage": e.get("stage"), "message": e["message"]})
