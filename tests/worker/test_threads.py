"""The service's background threads (the reaper, the heartbeats) behave as threads: they
stop when asked, join() returns, and a fork in their process (serve starting a worker) leaves
the child quiet. They once kept their stop Event in `_stop`, which is threading.Thread's own
method: join() and every fork's _after_fork then raised TypeError."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from app.core.config import Settings
from app.jobs.reaper import Reaper
from worker.presence import JobHeartbeat

SETTINGS = Settings(REAPER_INTERVAL_SECONDS=3600, HEARTBEAT_SECONDS=3600)


def _threads():
    # Neither touches its database before its first interval (an hour here).
    reaper = Reaper(None, SETTINGS, lambda *_: None)  # type: ignore[arg-type]
    beat = JobHeartbeat(SimpleNamespace(settings=SETTINGS), "job", "worker")  # type: ignore[arg-type]
    return [reaper, beat]


@pytest.mark.parametrize("thread", _threads(), ids=["reaper", "heartbeat"])
def test_a_stopped_thread_joins(thread):
    thread.start()
    thread.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_fork_beside_the_threads_is_quiet(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys
        from tests.worker.test_threads import _threads
        threads = _threads()
        for t in threads:
            t.start()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        for t in threads:
            t.stop()
            t.join(timeout=10)
        print("done")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert "Exception ignored" not in out.stderr, out.stderr
