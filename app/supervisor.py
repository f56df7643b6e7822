"""`distillery serve`'s embedded worker, supervised.

The worker is a child process. When it dies (a crash, the OOM killer, a stray `kill -9`) the
supervisor notices at once (it is waiting on the child), reaps it, releases the job it held so
that the restarted worker resumes it from its last checkpoint (instead of after the
heartbeat timeout), and starts a new worker after a backoff: 1 s, doubling to 30 s while
workers keep dying young, back to 1 s once one has lived a minute. Stopping `serve` stops the
worker; if `serve` itself is killed, the kernel sends the worker SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from app.core.config import Settings
from app.core.db import Database
from app.jobs import lifecycle, workers

BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER = 1.0, 30.0, 60.0
STOP_GRACE = 0.5  # seconds; part of the restart's backoff, not added to it
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # Not Linux (no libc.so.6): serve's own shutdown still stops the worker.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class WorkerSupervisor:
    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        settings: Settings,
        enqueue: Callable[[str, str], None],
        log: Callable[[str], None],
        *,
        db_info: dict[str, Any] | None = None,
    ) -> None:
        self.cmd, self.env, self.settings, self.enqueue, self.log = cmd, env, settings, enqueue, log
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="supervisor")
        # db_info: what its sessions need, e.g. to send the webhooks of a job it fails.
        self._db = Database(settings.database_url, info=db_info)

    def start(self) -> None:
        self.proc = self._spawn()
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.cmd, env=self.env, preexec_fn=_die_with_parent)

    def _watch(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            proc, started = self.proc, time.monotonic()
            assert proc is not None
            code = proc.wait()  # reaps it: no zombie
            # A signal to serve's whole process group (systemd, `docker stop`) reaches the
            # worker and serve together; serve's handler marks the stop (stopping()) within a
            # moment of the worker's exit, maybe just after it: wait for that moment.
            if self._stopping.wait(STOP_GRACE):
                return
            if time.monotonic() - started >= STABLE_AFTER:
                delay = BACKOFF_FIRST
            self.restarts += 1
            released = self._release(proc.pid)
            held = f"; re-queued {', '.join(released)}" if released else ""
            self.log(
                f"worker (pid {proc.pid}) {describe_exit(code)}{held}; "
                f"restarting it in {delay:.0f} s (restart {self.restarts})"
            )
            if self._stopping.wait(max(delay - STOP_GRACE, 0.0)):
                return
            self.proc = self._spawn()
            self.log(f"worker restarted (pid {self.proc.pid})")
            delay = min(delay * 2, BACKOFF_MAX)

    def _release(self, pid: int) -> list[str]:
        """Hand the dead worker's jobs back to the queue now; if the database cannot be
        reached, the reaper does it after HEARTBEAT_TIMEOUT_SECONDS instead."""
        name = workers.worker_name(socket.gethostname(), pid)
        try:
            with self._db.session() as s:
                to_send = workers.release_worker(
                    s, worker=name, max_attempts=self.settings.MAX_ATTEMPTS
                )
        except Exception as e:
            self.log(f"could not release the jobs of {name} ({e}); the reaper will")
            return []
        for job_id, queue in to_send:
            try:
                self.enqueue(job_id, queue)
                lifecycle.mark_enqueued(self._db.engine, job_id=job_id)
            except Exception:  # left unsent: the reaper sends it on its next pass
                pass
        return [job_id for job_id, _ in to_send]

    def stopping(self) -> None:
        """serve is shutting down: a worker that exits from now on is not restarted. Safe
        in a signal handler (it only sets an Event)."""
        self._stopping.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._db.dispose()


def serve_log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} distillery serve: {message}", file=sys.stderr, flush=True)
