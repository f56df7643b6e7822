"""The API under test for the benchmarks: `python -m app.cli api` on loopback, started with an
environment free of stray Distillery settings and stopped with its process group."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from app.testing import REPO, api_up, free_port, spawn_cli, stop_group


def base_env() -> dict[str, str]:
    """This environment without any Distillery setting, so nothing stray leaks into the API."""
    from app.core.config import Settings

    fields = {name.upper() for name in Settings.model_fields}  # pydantic-settings ignores case
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return env


@dataclass
class Server:
    url: str
    workers: int
    pid: int  # the process started (with one worker, the one that serves)


@contextmanager
def api_server(
    env: dict[str, str], workers: int, log_path: Path, cwd: Path = REPO
) -> Iterator[Server]:
    """`python -m app.cli api --port P [--workers N]` of the checkout at `cwd`, ready when every
    process has started."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["api", "--port", str(port), *(["--workers", str(workers)] if workers > 1 else [])]
    with ExitStack() as cleanup:
        log = cleanup.enter_context(open(log_path, "ab"))
        start = log_path.stat().st_size
        proc = spawn_cli(args, env, log, cwd)
        cleanup.callback(stop_group, proc)

        def started() -> bool:
            with open(log_path, "rb") as f:
                f.seek(start)
                return f.read().count(b"Application startup complete") >= workers

        deadline = time.monotonic() + 120
        while not (started() and ready(url)):
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited ({proc.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API was not ready after 120 s; see {log_path}")
            time.sleep(0.2)
        yield Server(url, workers, proc.pid)


def ready(url: str) -> bool:
    return api_up(url)  # no worker here: /readyz itself stays 503
