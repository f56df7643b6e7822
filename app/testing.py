"""Helpers that the test suite and the benchmarks share: the local PostgreSQL and Redis, a
throwaway database, a free port, and the tiny job they both submit. Not used by the service."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"  # a database to CREATE DATABASE from
REDIS_URL = "redis://127.0.0.1:6379/0"

# A whole job that runs in a few seconds on one CPU thread: every stage, on 300 digits.
TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "dataset": {"source": "builtin", "name": "digits", "max_samples": 300},
    "teacher": {"source": "train", "arch": "cnn_tiny", "epochs": 2},
    "student": {"arch": "cnn_tiny", "arch_kwargs": {"widths": [8, 16]}},
    "distill": {"epochs": 2},
    "prune": {"amount": 0.5, "finetune_epochs": 1},
    "quantize": {"method": "int8_static", "calibration_samples": 32},
    # No interleaved speed comparisons: which tiny model is faster is a coin toss on a shared
    # host, and these specs are for testing everything else (tests of speed set them).
    "evaluate": {"latency_runs": 5, "latency_warmup": 1, "compare_rounds": 0},
}


# A whole job whose models really learn, in ~3 s on one thread: on 300 digits over seeds 0-2
# the teacher scored 0.93-1.0 and the final int8 model 0.83-0.90 (accuracy drop 0.10, 8.6x
# smaller). Gates checked on it (accuracy_drop <= 0.25, size_ratio >= 6) fail for a model at
# chance (drop ~0.8) and for an unpruned student (4.4x): tests of gates use this, not TINY_SPEC.
LEARNING_SPEC: dict[str, Any] = {
    "name": "learning",
    "dataset": {"source": "builtin", "name": "digits", "max_samples": 300},
    "teacher": {"source": "train", "arch": "cnn_small", "epochs": 20, "lr": 1e-2, "batch_size": 32},
    "student": {"arch": "cnn_tiny"},
    "distill": {"epochs": 20, "lr": 1e-2, "batch_size": 32},
    "prune": {"amount": 0.3, "finetune_epochs": 8},
    "quantize": {"method": "int8_static", "calibration_samples": 64},
    "evaluate": {"latency_runs": 10, "latency_warmup": 2, "compare_rounds": 0},  # as TINY_SPEC
}


@contextmanager
def postgres_database(admin: str = PG_ADMIN, prefix: str = "distillery_test") -> Iterator[str]:
    """A new, empty database on `admin`'s server (its SQLAlchemy URL), dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    host = admin.split("://", 1)[1].rsplit("/", 1)[0]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{host}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def api_up(url: str) -> bool:
    """The API answers and its own dependencies (database, broker, storage) are fine; unlike
    a 200 from /readyz, this does not need a worker, so an API started alone passes."""
    import httpx

    try:
        checks = httpx.get(f"{url}/readyz", timeout=2).json()["checks"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return all(checks.get(k) == "ok" for k in ("database", "broker", "storage"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_cli(args: list[str], env: dict[str, str], log, cwd: Path = REPO) -> subprocess.Popen:
    """`python -m app.cli ARGS` in a session of its own, so that stop_group() reaches its
    children too (uvicorn's worker processes, serve's worker). `cwd`: the checkout whose code
    runs (`python -m` imports from it first)."""
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, give it 20 s, then SIGKILL what is left of it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    with suppress(ProcessLookupError):  # stragglers of the group, e.g. an orphaned worker
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
