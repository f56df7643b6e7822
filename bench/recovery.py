"""How soon the service recovers and refuses: the timing half of tests/reliability, whose
tests check what happens (a job fails `worker_lost`, bad requests get their 413/422, the API
keeps answering) and leave how soon to this benchmark.

    python -m bench.recovery [--write docs/BENCHMARKS.md]

On the reliability tests' own stack (tests/service_support.running_stack: `distillery api`
and `distillery worker` processes on a fresh PostgreSQL database and Redis, with
HEARTBEAT_TIMEOUT_SECONDS=10, a reaper pass each second and MAX_ATTEMPTS=2):

  worker_lost   a job's worker is SIGKILLed on each of its two attempts; seconds from the
                last kill to the job reading `failed` (polled every 0.3 s). Target: under
                25 s (the heartbeat timeout, a reaper pass, and the poll).
  bad requests  each of test_limits.py's bad requests (a 15 MB spec, a 20,000-layer spec, a
                chunked 4 MiB body, `Content-Length: 1000000000`) answered within 2 s, and
                /healthz, polled every 50 ms throughout, within 2 s every time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.common import command_line, load_average, machine, markers, utc_now, write_section
from distillery_contract.errors import ErrorCode
from tests.service_support import (  # the tests' stack, so the numbers are theirs
    TINY_SPEC,
    a_job_whose_workers_die,
    post_declaring,
    running_stack,
    wait_for_status,
)

LOST_TARGET = 25.0  # seconds from the last kill to `failed`
PROMPT = 2.0  # seconds: each bad request's answer, and every health check's


def worker_lost_seconds(stack) -> float:
    with stack.client() as c:
        job_id = a_job_whose_workers_die(stack, c, attempts=2)  # the stack's MAX_ATTEMPTS
        killed = time.monotonic()
        done = wait_for_status(c, job_id, {"failed"}, timeout=120)
        took = time.monotonic() - killed
    if done["error"]["code"] != ErrorCode.WORKER_LOST:
        raise RuntimeError(f"the job failed otherwise: {done['error']}")
    return took


def _bad_requests(stack) -> dict[str, Callable[[httpx.Client], httpx.Response]]:
    huge = json.dumps({"student": {"arch": "mlp", "arch_kwargs": {"hidden": [1] * 5_000_000}}})
    deep = json.dumps({"student": {"arch": "mlp", "arch_kwargs": {"hidden": [1] * 20_000}}})
    json_body = {"content-type": "application/json"}

    def chunked():  # 4 MiB without a Content-Length
        for _ in range(64):
            yield b" " * 65536

    return {
        "15 MB spec": lambda c: c.post("/v1/jobs", content=huge, headers=json_body),
        "20,000-layer spec": lambda c: c.post("/v1/jobs", content=deep, headers=json_body),
        "chunked 4 MiB": lambda c: c.post("/v1/jobs", content=chunked(), headers=json_body),
        "Content-Length: 1000000000": lambda c: post_declaring(
            stack.url,
            "/v1/jobs",
            key=stack.key,
            length=1_000_000_000,
            content_type="application/json",
        ),  # fmt: skip
    }


def bad_request_seconds(stack) -> tuple[dict[str, tuple[int, float]], float]:
    """Each bad request's (status, seconds), and the slowest /healthz answer meanwhile."""
    answers: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=stack.url, timeout=30) as c:
            while not stop.is_set():
                started = time.perf_counter()
                c.get("/healthz").raise_for_status()
                answers.append(time.perf_counter() - started)
                stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out: dict[str, tuple[int, float]] = {}
    try:
        with stack.client() as c:
            for what, send in _bad_requests(stack).items():
                started = time.perf_counter()
                r = send(c)
                out[what] = (r.status_code, time.perf_counter() - started)
    finally:
        stop.set()
        poller.join(timeout=30)
    return out, max(answers)


def run(profile: str, write: Path | None) -> bool:
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp)) as stack:
        with stack.client() as c:  # one ordinary job first, as test_limits does
            c.post("/v1/jobs", json=TINY_SPEC).raise_for_status()
        requests, slowest = bad_request_seconds(stack)
        lost = worker_lost_seconds(stack)
    rows = [
        f"| {what} | {status} | {seconds:.3f} s | < {PROMPT:.0f} s |"
        for what, (status, seconds) in requests.items()
    ]
    rows.append(f"| slowest /healthz meanwhile | 200 | {slowest:.3f} s | < {PROMPT:.0f} s |")
    rows.append(f"| last kill -> `worker_lost` | failed | {lost:.1f} s | < {LOST_TARGET:.0f} s |")
    met = (
        all(seconds < PROMPT for _, seconds in requests.values())
        and slowest < PROMPT
        and lost < LOST_TARGET
    )
    start, end = markers("recovery")
    body = "\n".join(
        [
            start,
            "## Recovery: a lost worker's job, and bad requests refused",
            "",
            f"`{command_line()}`, {utc_now()}, {machine()}, load average {load_average()}.",
            "The reliability tests' stack (tests/service_support.running_stack): "
            "HEARTBEAT_TIMEOUT_SECONDS=10, a reaper pass each second, MAX_ATTEMPTS=2.",
            "",
            "| what | answer | took | target |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Targets {'met' if met else 'missed'}.",
            end,
        ]
    )
    print(body)
    if write is not None:
        write_section(write, "recovery", body)
    return met


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__)
    parser.add_argument("--write", type=Path, help="(re)write the section in this file")
    args = parser.parse_args()
    raise SystemExit(0 if run("default", args.write) else 1)


if __name__ == "__main__":
    main()
