"""Pipeline events -> job rows and job events (what `GET /v1/jobs/{id}` and the SSE stream
show). Progress is throttled; stage changes, metrics, log lines and the training history are
not."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy.orm import Session

from app.jobs import events, history, lifecycle, search
from app.jobs.states import StageStatus
from worker.presence import JobHeartbeat
from worker.runtime import Runtime

log = logging.getLogger("distillery.worker")


class Recorder:
    """`span`: where the events' progress (0..1) falls in the job's (a search's teacher phase
    is its first fifth). `candidates_for`: the search a branch lists its candidates on."""

    def __init__(
        self,
        runtime: Runtime,
        job_id: str,
        worker_id: str,
        hb: JobHeartbeat | None,
        *,
        span: tuple[float, float] = (0.0, 1.0),
        candidates_for: str | None = None,
    ) -> None:
        self.runtime, self.job_id, self.worker_id, self.hb = runtime, job_id, worker_id, hb
        self.span, self.candidates_for = span, candidates_for
        self._last_progress = 0.0
        self._last_stage = ""
        self._history: list[dict[str, Any]] = []  # rows not stored yet
        self._writers = {
            "progress": self._progress,
            "stage": self._stage,
            "metrics": self._metrics,
            "log": self._log,
            "candidate": self._candidate,
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
                if not history.record_history(
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
        events.add_event(s, job_id=self.job_id, type=kind, data=data)

    def _progress(self, s: Session, e: dict[str, Any]) -> None:
        lo, hi = self.span
        progress = lo + (hi - lo) * e["progress"]
        if not lifecycle.set_progress(
            s, job_id=self.job_id, worker_id=self.worker_id, stage=e["stage"], progress=progress
        ):
            self.hb.lost.set()  # another attempt owns the job now
            return
        data = {"stage": e["stage"], "progress": round(progress, 4)}
        if e.get("message"):
            data["message"] = e["message"]
        self._event(s, "progress", data)

    def _stage(self, s: Session, e: dict[str, Any]) -> None:
        status = StageStatus(e["status"])
        fresh = status == StageStatus.SUCCEEDED and not e.get("resumed")
        seconds = lifecycle.set_stage(
            s,
            job_id=self.job_id,
            worker_id=self.worker_id,
            name=e["stage"],
            status=status,
            seconds=e.get("seconds"),
            metrics=e.get("metrics") if fresh else None,
            resumed=bool(e.get("resumed")),
        )
        data = {k: v for k, v in e.items() if k != "type"}
        if fresh and seconds is not None:
            # As recorded: every attempt's time (one stage can span two workers), and a
            # search's stage, which its branches ran, gets one at all.
            data["seconds"] = seconds
        self._event(s, "stage", data)

    def _metrics(self, s: Session, e: dict[str, Any]) -> None:
        lifecycle.set_model_metrics(
            s, job_id=self.job_id, worker_id=self.worker_id, model=e["model"], metrics=e["metrics"]
        )
        self._event(s, "metrics", {"model": e["model"], "metrics": e["metrics"]})

    def _candidate(self, s: Session, e: dict[str, Any]) -> None:
        if self.candidates_for is not None:
            search.record_candidate(s, job_id=self.candidates_for, record=e["candidate"])
        key = e["candidate"]["key"]
        self._event(s, "log", {"stage": "branch", "message": f"candidate {key} measured"})

    def _log(self, s: Session, e: dict[str, Any]) -> None:
        self._event(s, "log", {"stage": e.get("stage"), "message": e["message"]})
