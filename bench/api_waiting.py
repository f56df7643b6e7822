"""Waiting clients: one API process holding hundreds of open event streams, concurrent GETs,
slow uploads and a tenant over its quota, while another tenant and a health probe measure
what everyone else gets (issue 26).

    python -m bench.api_load --scenario waiting [--mode embedded|postgres|both] [--write docs/BENCHMARKS.md]

Each mode runs one API process (`python -m app.cli api`, loopback): `embedded` on SQLite with
the default embedded broker (a SQLite file), as `distillery serve` runs it, without its
worker; `postgres` on a fresh PostgreSQL database (dropped at the end) with Redis as the
broker, under a queue of its own (deleted at the end). No worker runs: the jobs stay queued.

In each mode, on a first API process (TENANT_MAX_STREAMS=600, every other quota at its default:
TENANT_MAX_REQUESTS=20):
  idle             a few seconds of the probes alone
  streams opening  the loaded tenant opens 500 event streams (GET /v1/jobs/{id}/events, one
                   connection each, 100 on each of 5 queued jobs) at once; a 429 is retried
                   after its Retry-After, as the distillery client does
  streams + GETs   with all of them open, 5 bursts of 200 concurrent GETs of the same tenant
                   (`/v1/jobs?limit=1` and `/v1/jobs/{id}`): its quota of 20 requests in
                   flight answers the excess with 429
  cancel fan-out   the 5 jobs are cancelled: every stream must get the `cancelled` status
                   event and end
  slow uploads     100 POST /v1/datasets over raw sockets, 20 from each of 5 tenants (an
                   upload holds one of its tenant's 20 request slots), each declaring its
                   Content-Length and sending one byte a second for 20 s, then the rest
Then a second API process with TENANT_MAX_REQUESTS=5:
  over quota       10 bursts of 50 concurrent GETs of one tenant: most get 429

Throughout, a separate process (its own event loop, so the load generator's does not delay
it) probes GET /healthz every 50 ms and, as a second tenant, polls GET /v1/jobs/{id} with a
0.1 s pause. The API's memory per open stream is its RSS (/proc/PID/status VmRSS) with the 500
streams open minus before, over 500.

Targets, per mode: no response >= 500 anywhere; every stream opens (gets its first event);
/healthz p99 < 100 ms and the second tenant's p99 < 500 ms in every window; after the cancel
every stream gets the status event and ends; the over-quota tenant gets 429s. The exit status
is 1 when one is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from app.testing import PG_ADMIN, REDIS_URL, TINY_SPEC, postgres_database
from bench.common import REPO, command_line, load_average, markers, utc_now, write_section
from bench.servers import Server, api_server, base_env

NAME = "api_waiting"
START, END = markers(NAME)
MODES = ("embedded", "postgres")
HEALTHZ_P99_MS = 100.0
OTHER_P99_MS = 500.0
PROBE_EVERY_S = 0.05  # /healthz
POLL_PAUSE_S = 0.1  # the second tenant, between its GETs
OPEN_TIMEOUT_S = 120.0  # for all streams to get their first event
CANCEL_TIMEOUT_S = 60.0  # for all streams to end after the cancels
REQUEST_TIMEOUT_S = 60.0
LOADED, OTHER = "loaded", "other"

Sample = tuple[float, float, int]  # (monotonic start, milliseconds, status; 0: no answer)


@dataclass(frozen=True)
class Profile:
    streams: int = 500
    jobs: int = 5  # the streams are spread over this many queued jobs
    gets: int = 200  # concurrent GETs of the loaded tenant per burst
    get_rounds: int = 5
    uploads: int = 100
    upload_tenants: int = 5  # an upload holds a request slot: 20 tenants' worth at the default
    trickle_s: int = 20  # each upload sends one byte a second for this long
    quota: int = 5  # TENANT_MAX_REQUESTS of the over-quota run
    quota_gets: int = 50
    quota_rounds: int = 10
    idle_s: float = 3.0


PROFILES = {"default": Profile(), "full": Profile(get_rounds=10, quota_rounds=20)}


# --- the stack -------------------------------------------------------------------------------


@contextmanager
def database(mode: str, home: Path, pg_admin: str) -> Iterator[str]:
    """The SQLAlchemy URL: a SQLite file in `home` (embedded) or a fresh PostgreSQL database."""
    if mode == "embedded":
        home.mkdir(parents=True, exist_ok=True)
        yield f"sqlite:///{home / 'distillery.db'}"
        return
    with postgres_database(pg_admin, prefix="distillery_bench") as url:
        yield url


def mode_env(mode: str, url: str, home: Path, redis_url: str, queue: str) -> dict[str, str]:
    env = {**base_env(), "DATABASE_URL": url, "DISTILLERY_HOME": str(home)}
    if mode == "postgres":
        env.update(BROKER_URL=redis_url, DEFAULT_QUEUE=queue)
    return env  # embedded: the default broker, a SQLite file in DISTILLERY_HOME


def make_keys(env: dict[str, str], names: list[str]) -> dict[str, str]:
    """Migrate the database, then one tenant and API key per name."""
    from app.core.db import Database
    from app.services import tenants

    cmd = [sys.executable, "-m", "app.cli", "migrate"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    db = Database(env["DATABASE_URL"])
    try:
        with db.session() as s:
            return {name: tenants.create_key(s, tenant_name=name) for name in names}
    finally:
        db.dispose()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def raise_fd_limit() -> None:
    """500 streams, 200 GETs and 100 uploads are a connection each, in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# uvicorn closes a keep-alive connection idle for 5 s: a client that kept it longer could
# send its next request just as the server closes it (a ReadError that is no server fault).
KEEPALIVE_S = 2.0


def client(server: Server, key: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=KEEPALIVE_S,
    )
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=REQUEST_TIMEOUT_S)
    return httpx.AsyncClient(base_url=server.url, headers=auth(key), limits=limits, timeout=timeout)


# --- the observer: /healthz and a second tenant, in a process of its own ---------------------


async def _probe(
    client: httpx.AsyncClient, path: str, every: float, pause: float, stop, errors: list[str]
) -> list[Sample]:
    samples: list[Sample] = []
    while not stop.is_set():
        started = time.monotonic()
        try:
            status = (await client.get(path)).status_code
        except httpx.HTTPError as e:
            status = 0
            errors.append(type(e).__name__)
        ms = (time.monotonic() - started) * 1000
        samples.append((started, ms, status))
        await asyncio.sleep(max(every - ms / 1000, 0.0) + pause)
    return samples


async def _observe(url: str, key: str, job: str, stop) -> dict[str, list]:
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_S)
    errors: list[str] = []
    async with (
        httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as health,
        httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=auth(key)) as other,
    ):
        h, o = await asyncio.gather(
            _probe(health, "/healthz", PROBE_EVERY_S, 0.0, stop, errors),
            _probe(other, f"/v1/jobs/{job}", 0.0, POLL_PAUSE_S, stop, errors),
        )
    return {"healthz": h, "other": o, "errors": errors}


def observe(url: str, key: str, job: str, stop, conn) -> None:
    """The observer process's body: probe until `stop` is set, then send the samples."""
    conn.send("ready")
    conn.send(asyncio.run(_observe(url, key, job, stop)))


@dataclass
class Run:
    """What one mode measured: time windows, and the observer's samples across them."""

    mode: str
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {"healthz": [], "other": []})
    requests: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (status, ms)
    streams: list[Stream] = field(default_factory=list)
    open_s: float = float("nan")
    cancel_s: float = float("nan")
    rss_before_kb: int = 0
    rss_with_kb: int = 0
    server_errors: list[str] = field(default_factory=list)  # from the API's logs
    errors: Counter[str] = field(default_factory=Counter)  # why a request got no answer

    @contextmanager
    def window(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        print(f"  [{self.mode}] {name} ...", flush=True)
        try:
            yield
        finally:
            self.windows[name] = (started, time.monotonic())

    def in_window(self, what: str, name: str) -> list[Sample]:
        start, end = self.windows[name]
        return [s for s in self.samples[what] if start <= s[0] <= end]


@contextmanager
def observer(run: Run, server: Server, key: str, job: str) -> Iterator[None]:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited loop
    stop, (recv, send) = ctx.Event(), ctx.Pipe(duplex=False)
    proc = ctx.Process(target=observe, args=(server.url, key, job, stop, send), daemon=True)
    proc.start()
    try:
        if not recv.poll(60) or recv.recv() != "ready":
            raise RuntimeError("the observer process did not start")
        yield
    finally:
        stop.set()
        if recv.poll(REQUEST_TIMEOUT_S + 10):
            observed = recv.recv()
            run.errors.update(observed.pop("errors"))
            for what, samples in observed.items():
                run.samples[what] += samples
        proc.join(10)
        if proc.is_alive():
            proc.kill()


# --- the load --------------------------------------------------------------------------------


@dataclass(eq=False)
class Stream:
    job: str
    status: int | None = None  # of the response that finally answered
    refused: int = 0  # 429s before it opened (each retried after Retry-After)
    first_at: float | None = None
    ended_at: float | None = None
    last_status: str | None = None  # the job status in its last `status` / `end` event
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.first_at is not None or self.ended_at is not None or self.error is not None


async def _read_events(response: httpx.Response, stream: Stream) -> None:
    kind = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
            if stream.first_at is None:
                stream.first_at = time.monotonic()
        elif line.startswith("data: ") and kind in ("status", "end"):
            stream.last_status = json.loads(line.removeprefix("data: ")).get("status")


async def follow(
    client: httpx.AsyncClient, stream: Stream, deadline: float, errors: Counter[str]
) -> None:
    """Open the stream (retrying 429s until `deadline`) and read it until the server ends it."""
    path = f"/v1/jobs/{stream.job}/events"
    try:
        while True:
            async with client.stream("GET", path) as r:
                stream.status = r.status_code
                if r.status_code == 200:
                    await _read_events(r, stream)
                    stream.ended_at = time.monotonic()
                    return
                await r.aread()
                retry = r.headers.get("Retry-After")
            if r.status_code != 429 or retry is None or time.monotonic() > deadline:
                return
            stream.refused += 1
            await asyncio.sleep(float(retry) * random.uniform(1.0, 1.5))  # spread the herd
    except httpx.HTTPError as e:
        stream.error = type(e).__name__
        stream.status = 0
        errors[stream.error] += 1


async def until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def burst(
    client: httpx.AsyncClient, paths: list[str], n: int, errors: Counter[str]
) -> list[tuple[int, float]]:
    """`n` GETs at once, cycling over `paths`: (status, ms) each; status 0 for no answer (its
    exception's name counted in `errors`)."""

    async def one(path: str) -> tuple[int, float]:
        started = time.monotonic()
        try:
            status = (await client.get(path)).status_code
        except httpx.HTTPError as e:
            status = 0
            errors[type(e).__name__] += 1
        return status, (time.monotonic() - started) * 1000

    return list(await asyncio.gather(*(one(paths[i % len(paths)]) for i in range(n))))


async def bursts(run: Run, server: Server, key: str, paths: list[str], n: int, rounds: int):
    out: list[tuple[int, float]] = []
    async with client(server, key, n) as c:
        for _ in range(rounds):
            out += await burst(c, paths, n, run.errors)
            await asyncio.sleep(0.2)
    return out


def get_paths(jobs: list[str]) -> list[str]:
    return [p for job in jobs for p in ("/v1/jobs?limit=1", f"/v1/jobs/{job}")]


# --- streams, GETs, cancel -------------------------------------------------------------------


async def submit_jobs(server: Server, key: str, n: int) -> list[str]:
    """`n` queued jobs (no worker reads their queue); the first also warms the API up (torch
    import, model checks) before anything is measured."""
    ids = []
    async with client(server, key, 1) as c:
        for i in range(n):
            r = await c.post("/v1/jobs", json={**TINY_SPEC, "name": f"waiting-{i}"})
            if r.status_code != 201:
                raise RuntimeError(f"POST /v1/jobs: {r.status_code} {r.text[:300]}")
            ids.append(r.json()["id"])
    return ids


async def warm_stream(server: Server, key: str, job: str) -> None:
    """One stream opened and closed before the baseline RSS: the feed's first use."""
    async with client(server, key, 1) as c, c.stream("GET", f"/v1/jobs/{job}/events") as r:
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                break


async def streams_and_gets(run: Run, server: Server, key: str, jobs: list[str], p: Profile):
    run.rss_before_kb = rss_kb(server.pid)
    run.streams = [Stream(jobs[i % len(jobs)]) for i in range(p.streams)]
    async with client(server, key, p.streams + 10) as c:
        with run.window("streams opening"):
            started = time.monotonic()
            deadline = started + OPEN_TIMEOUT_S
            tasks = [asyncio.create_task(follow(c, s, deadline, run.errors)) for s in run.streams]
            await until(lambda: all(s.done for s in run.streams), OPEN_TIMEOUT_S)
            run.open_s = time.monotonic() - started
        await asyncio.sleep(1.0)  # let the process settle before reading its memory
        run.rss_with_kb = rss_kb(server.pid)
        with run.window("streams + GETs"):
            run.requests["GETs while streaming"] = await bursts(
                run, server, key, get_paths(jobs), p.gets, p.get_rounds
            )
        with run.window("cancel fan-out"):
            run.requests["cancels"], run.cancel_s = await cancel(c, jobs, run.streams)
        for task in tasks:
            task.cancel()  # any stream still open: the report counts it as not ended
        await asyncio.gather(*tasks, return_exceptions=True)


async def cancel(c: httpx.AsyncClient, jobs: list[str], streams: list[Stream]) -> tuple:
    """Cancel every job; seconds from the first cancel until the last open stream ended."""
    started, answers = time.monotonic(), []
    for job in jobs:
        t = time.monotonic()
        r = await c.post(f"/v1/jobs/{job}/cancel")
        answers.append((r.status_code, (time.monotonic() - t) * 1000))
    opened = [s for s in streams if s.first_at is not None]
    await until(lambda: all(s.ended_at is not None for s in opened), CANCEL_TIMEOUT_S)
    ended = [s.ended_at for s in opened if s.ended_at is not None]
    return answers, (max(ended) - started if ended else float("nan"))


# --- slow uploads ----------------------------------------------------------------------------


def dataset_body() -> tuple[bytes, str]:
    """A small valid .npz dataset as a multipart/form-data body, and its Content-Type."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, x=rng.random((64, 8), dtype=np.float32), y=np.arange(64) % 2)
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.npz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + buf.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


async def slow_upload(
    server: Server, key: str, trickle_s: int, errors: Counter[str]
) -> tuple[int, float]:
    """POST /v1/datasets declaring its whole Content-Length, its first `trickle_s` bytes one a
    second, then the rest: (status, ms). Status 0: the connection ended without an answer."""
    body, content_type = dataset_body()
    host, port = server.url.removeprefix("http://").split(":")
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        writer.write(head.encode())
        for i in range(trickle_s):
            writer.write(body[i : i + 1])
            await writer.drain()
            await asyncio.sleep(1.0)
        writer.write(body[trickle_s:])
        await writer.drain()
    except OSError:
        pass  # the server answered early and closed: its answer is still to be read
    try:
        line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
        status = int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0
    except (OSError, TimeoutError, ValueError, IndexError) as e:
        status = 0
        errors[type(e).__name__] += 1
    finally:
        writer.close()
    return status, (time.monotonic() - started) * 1000


async def slow_uploads(run: Run, server: Server, keys: list[str], p: Profile) -> None:
    with run.window("slow uploads"):
        run.requests["slow uploads"] = list(
            await asyncio.gather(
                *(
                    slow_upload(server, keys[i % len(keys)], p.trickle_s, run.errors)
                    for i in range(p.uploads)
                )
            )
        )


# --- one mode --------------------------------------------------------------------------------


async def first_server(run: Run, server: Server, keys: dict[str, str], p: Profile) -> None:
    """Streams, GETs, cancels and slow uploads against the API with the default quotas."""
    jobs = await submit_jobs(server, keys[LOADED], p.jobs)
    other_job = (await submit_jobs(server, keys[OTHER], 1))[0]
    await warm_stream(server, keys[LOADED], jobs[0])
    with observer(run, server, keys[OTHER], other_job):
        with run.window("idle"):
            await asyncio.sleep(p.idle_s)
        await streams_and_gets(run, server, keys[LOADED], jobs, p)
        uploaders = [keys[f"uploader-{i}"] for i in range(p.upload_tenants)]
        await slow_uploads(run, server, uploaders, p)


async def quota_server(run: Run, server: Server, keys: dict[str, str], p: Profile) -> None:
    async with client(server, keys[OTHER], 1) as c:
        other_job = (await c.get("/v1/jobs?limit=1")).json()["data"][0]["id"]
    async with client(server, keys[LOADED], 1) as c:
        jobs = [j["id"] for j in (await c.get("/v1/jobs?limit=5")).json()["data"]]
    with observer(run, server, keys[OTHER], other_job), run.window("over quota"):
        run.requests["over quota"] = await bursts(
            run, server, keys[LOADED], get_paths(jobs), p.quota_gets, p.quota_rounds
        )


def measure_mode(mode: str, p: Profile, tmp: Path, pg_admin: str, redis_url: str) -> Run:
    run = Run(mode)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    home = tmp / f"home-{mode}"
    names = [LOADED, OTHER, *(f"uploader-{i}" for i in range(p.upload_tenants))]
    try:
        with database(mode, home, pg_admin) as url:
            env = mode_env(mode, url, home, redis_url, queue)
            keys = make_keys(env, names)
            streams_env = {**env, "TENANT_MAX_STREAMS": str(p.streams + 100)}
            with api_server(streams_env, 1, tmp / f"api-{mode}.log") as server:
                asyncio.run(first_server(run, server, keys, p))
            quota_env = {**env, "TENANT_MAX_REQUESTS": str(p.quota)}
            with api_server(quota_env, 1, tmp / f"api-{mode}-quota.log") as server:
                asyncio.run(quota_server(run, server, keys, p))
            run.server_errors = server_errors(tmp, mode)
    finally:
        if mode == "postgres":
            import redis

            r = redis.Redis.from_url(redis_url)
            for k in r.scan_iter(f"*{queue}*"):  # the queue and kombu's binding of it
                r.delete(k)
    return run


def server_errors(tmp: Path, mode: str) -> list[str]:
    """Lines of the API's logs that say it failed: a traceback, or a 5xx in the access log
    (but /readyz's 503: no worker runs, so it is never ready)."""
    bad = []
    for log in sorted(tmp.glob(f"api-{mode}*.log")):
        lines = log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if "/readyz " in line:
                continue
            if line.startswith("Traceback"):
                # The whole traceback (to its exception line), so the run itself says what failed.
                end = next((j for j in range(i + 1, len(lines)) if not lines[j][:1].isspace()), i)
                bad.append(f"{log.name}: " + "\n".join(lines[i : end + 1]))
            elif not line[:1].isspace() and " 50" in line.rsplit('"', 1)[-1]:
                bad.append(f"{log.name}: {line.strip()[:200]}")
    return bad


def _one_line(error: str) -> str:
    """A traceback as its log's name and its exception line (for the Markdown)."""
    lines = error.splitlines()
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()[:200]}"


# --- the report ------------------------------------------------------------------------------

WINDOWS = ("idle", "streams opening", "streams + GETs", "cancel fan-out", "slow uploads")
WINDOWS += ("over quota",)
OK = {200, 201, 202}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def failed(statuses: list[int]) -> int:
    """Answers >= 500, and requests that got no answer at all."""
    return sum(1 for s in statuses if s >= 500 or s == 0)


def stream_opens(run: Run) -> tuple[Counter, list[float]]:
    """Every try at opening a stream by status, and each stream's seconds to its first event."""
    counts: Counter[int] = Counter()
    for s in run.streams:
        counts[s.status or 0] += 1
        counts[429] += s.refused
    start = run.windows["streams opening"][0]
    return counts, [(s.first_at - start) * 1000 for s in run.streams if s.first_at is not None]


def others_table(runs: list[Run]) -> str:
    lines = [
        "| mode | window | seconds | `/healthz` n | p50 (ms) | p99 (ms) | max (ms) "
        "| other tenant n | p50 (ms) | p99 (ms) | max (ms) | >= 500 or no answer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        for name in WINDOWS:
            if name not in run.windows:
                continue
            start, end = run.windows[name]
            cells = [run.mode, name, f"{end - start:.1f}"]
            bad = 0
            for what in ("healthz", "other"):
                samples = run.in_window(what, name)
                ms = [s[1] for s in samples]
                bad += failed([s[2] for s in samples])
                cells += [str(len(ms)), f"{pct(ms, 50):.1f}", f"{pct(ms, 99):.1f}"]
                cells.append(f"{max(ms, default=float('nan')):.1f}")
            lines.append("| " + " | ".join([*cells, str(bad)]) + " |")
    return "\n".join(lines)


def loaded_table(runs: list[Run]) -> str:
    lines = [
        "| mode | requests | tenant(s) | tries | 2xx | 429 | >= 500 | no answer | other "
        "| p50 (ms) | p99 (ms) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        opens, first = stream_opens(run)
        rows = [("stream opens (to the first event)", "loaded", opens, first)]
        for what, answers in run.requests.items():
            who = "5 uploaders" if what == "slow uploads" else "loaded"
            rows.append((what, who, Counter(a[0] for a in answers), [a[1] for a in answers]))
        for what, who, counts, ms in rows:
            ok = sum(n for s, n in counts.items() if s in OK)
            high = sum(n for s, n in counts.items() if s >= 500)
            other = counts.total() - ok - counts[429] - high - counts[0]
            lines.append(
                f"| {run.mode} | {what} | {who} | {counts.total()} | {ok} | {counts[429]} "
                f"| {high} | {counts[0]} | {other} | {pct(ms, 50):.0f} | {pct(ms, 99):.0f} |"
            )
    return "\n".join(lines)


def streams_table(runs: list[Run]) -> str:
    lines = [
        "| mode | streams | opened | all opened after (s) | RSS before (MiB) "
        "| RSS with them open (MiB) | per open stream (KiB) | ended with `cancelled` "
        "| cancel -> last stream ended (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        n = len(run.streams)
        opened = sum(s.first_at is not None for s in run.streams)
        per = (run.rss_with_kb - run.rss_before_kb) / max(n, 1)
        lines.append(
            f"| {run.mode} | {n} | {opened} | {run.open_s:.1f} | {run.rss_before_kb / 1024:.0f} "
            f"| {run.rss_with_kb / 1024:.0f} | {per:.1f} | {cancelled(run)} | {run.cancel_s:.2f} |"
        )
    return "\n".join(lines)


def cancelled(run: Run) -> int:
    return sum(s.ended_at is not None and s.last_status == "cancelled" for s in run.streams)


def checks(run: Run) -> list[tuple[str, bool, str]]:
    """(target, met, what was measured) for one mode."""
    statuses = [a[0] for answers in run.requests.values() for a in answers]
    statuses += [s.status or 0 for s in run.streams]
    statuses += [s[2] for samples in run.samples.values() for s in samples]
    opened = sum(s.first_at is not None for s in run.streams)
    worst = {}
    for what in ("healthz", "other"):
        p99s = {w: pct([s[1] for s in run.in_window(what, w)], 99) for w in run.windows}
        worst[what] = max(p99s.items(), key=lambda kv: kv[1])
    quota_429 = sum(a[0] == 429 for a in run.requests.get("over quota", []))
    (hw, hv), (ow, ov) = worst["healthz"], worst["other"]
    return [
        ("no response >= 500, none unanswered", failed(statuses) == 0, f"{failed(statuses)}"),
        ("every stream opens", opened == len(run.streams), f"{opened}/{len(run.streams)}"),
        (f"/healthz p99 < {HEALTHZ_P99_MS:.0f} ms", hv < HEALTHZ_P99_MS, f"{hv:.1f} ({hw})"),
        (f"other tenant p99 < {OTHER_P99_MS:.0f} ms", ov < OTHER_P99_MS, f"{ov:.1f} ({ow})"),
        (
            "every stream ends with `cancelled`",
            cancelled(run) == len(run.streams),
            f"{cancelled(run)}/{len(run.streams)} in {run.cancel_s:.2f} s",
        ),
        ("the over-quota tenant gets 429s", quota_429 > 0, f"{quota_429}"),
    ]


def verdict(runs: list[Run]) -> tuple[bool, str]:
    lines, ok = [], True
    for run in runs:
        parts = []
        for target, met, measured in checks(run):
            ok &= met
            parts.append(f"{target}: {measured} {'PASS' if met else 'FAIL'}")
        lines.append(f"- {run.mode}: " + "; ".join(parts))
    return ok, "\n".join([*lines, "", f"Targets -> **{'PASS' if ok else 'FAIL'}**"])


def section(command: str, runs: list[Run], p: Profile, where: str, loads: tuple[str, str]) -> str:
    _, line = verdict(runs)
    errors = [e for run in runs for e in run.server_errors]
    return "\n".join(
        [
            START,
            "## API with waiting clients: open event streams, slow uploads, tenant quotas",
            "",
            "One API process (`python -m app.cli api`, uvicorn, loopback) in each mode: "
            "**embedded** on SQLite with the default embedded broker (a SQLite file), as "
            "`distillery serve` runs it, without its worker; **postgres** on a fresh PostgreSQL "
            "database with Redis as broker. No worker: the jobs stay queued. The load comes "
            "from one asyncio + httpx process (HTTP/1.1, a connection per stream and per "
            "concurrent request; uploads over raw sockets). /healthz (every 50 ms) and a "
            "second tenant polling `GET /v1/jobs/{id}` (0.1 s between answers) are measured "
            "by a process of their own, so that the load generator's event loop does not "
            "delay them. The loaded tenant first opens "
            f"{p.streams} event streams at once ({p.streams // p.jobs} on each of {p.jobs} "
            "queued jobs; a 429 is retried after its Retry-After, as the distillery client "
            f"does), then, with all of them open, sends {p.get_rounds} bursts of {p.gets} "
            "concurrent GETs (`/v1/jobs?limit=1` and `/v1/jobs/{id}`), then cancels the jobs: "
            f"every stream must get the `cancelled` status event and end. Then {p.uploads} "
            f"uploads (`POST /v1/datasets`, {p.uploads // p.upload_tenants} from each of "
            f"{p.upload_tenants} tenants: an upload holds one of its tenant's request slots) "
            f"declare their Content-Length and send one byte a second for {p.trickle_s} s, "
            "then the rest of a small .npz. Last, on a second API process with "
            f"TENANT_MAX_REQUESTS={p.quota}, one tenant sends {p.quota_rounds} bursts of "
            f"{p.quota_gets} concurrent GETs. Memory per stream: the API process's RSS "
            f"(VmRSS) with the {p.streams} streams open minus before, over {p.streams}.",
            "",
            f"- Command: `{command}`",
            f"- Machine: {where}",
            f"- Date: {utc_now()}",
            f"- Load average (1, 5, 15 min; 2 CPUs shared with other users) at the start: "
            f"{loads[0]}; at the end: {loads[1]}",
            f"- API settings: defaults (API_THREADS=40, TENANT_MAX_REQUESTS=20) except "
            f"TENANT_MAX_STREAMS={p.streams + 100} (the over-quota run: TENANT_MAX_REQUESTS="
            f"{p.quota}, TENANT_MAX_STREAMS at its default)",
            "",
            "What everyone else got, per window of the run:",
            "",
            others_table(runs),
            "",
            "The loaded tenants' own requests (p50/p99: of every answer, 429s included; for "
            "the stream opens, from the start of the window to the stream's first event):",
            "",
            loaded_table(runs),
            "",
            "The streams:",
            "",
            streams_table(runs),
            "",
            f"Tracebacks or 5xx lines in the API's logs: {len(errors)}"
            + (": " + "; ".join(f"`{_one_line(e)}`" for e in errors[:5]) if errors else "")
            + ". Requests that got no answer, by the client's exception: "
            + "; ".join(f"{run.mode}: {dict(run.errors) or 'none'}" for run in runs),
            "",
            line,
            END,
        ]
    )


def bench(
    profile: str,
    write: Path | None,
    *,
    modes: tuple[str, ...] = MODES,
    pg_admin: str = PG_ADMIN,
    redis_url: str = REDIS_URL,
    keep_logs: bool = False,
) -> bool:
    """Run the scenario in each mode, print the tables, write the section; True when it passes."""
    chosen = PROFILES[profile]
    raise_fd_limit()
    # What the API processes get too (base_env); set before bench.common.machine() imports torch.
    os.environ.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    tmp = Path(tempfile.mkdtemp(prefix="distillery-api-waiting-"))
    started_load = load_average()
    try:
        runs = [measure_mode(mode, chosen, tmp, pg_admin, redis_url) for mode in modes]
    finally:
        if keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    loads = (started_load, load_average())
    for table in (others_table(runs), loaded_table(runs), streams_table(runs)):
        print(f"\n{table}")
    ok, line = verdict(runs)
    print(f"\n{line.replace('**', '')}\nload average: {loads[0]} -> {loads[1]}")
    for run in runs:
        print(
            f"{run.mode}: no answer: {dict(run.errors)}; in the API's logs: {len(run.server_errors)}"
        )
        for error in run.server_errors:
            print(error)
    if write is not None:
        from bench.common import machine  # imports torch: only now, the servers are gone

        write_section(write, NAME, section(command_line(), runs, chosen, machine(), loads))
        print(f"wrote {write}")
    return ok


def run(profile: str, write: Path | None) -> bool:
    """Run the scenario with `profile` in both modes, print its tables, and when `write` is
    given rewrite its section there. True when every target is met."""
    return bench(profile, write)


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: servers, DB, Redis


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode", choices=[*MODES, "both"], default="both", help="waiting clients: which API"
    )


def modes(mode: str) -> tuple[str, ...]:
    return MODES if mode == "both" else (mode,)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_waiting", description=__doc__)
    parser.add_argument("--profile", choices=list(PROFILES), default="default")
    add_arguments(parser)
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="a database to CREATE DATABASE from")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--keep-logs", action="store_true", help="keep the API logs")
    parser.add_argument("--write", type=Path, help="(re)write the result section in this file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    ok = bench(
        args.profile,
        args.write,
        modes=modes(args.mode),
        pg_admin=args.pg_admin,
        redis_url=args.redis_url,
        keep_logs=args.keep_logs,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
