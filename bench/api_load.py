"""The API under load: one job (GET /v1/jobs/{id}), create a job (POST /v1/jobs) and the job
list, measured by wrk against the real server (`python -m app.cli api`) on loopback, with
PostgreSQL and Redis behind it.

    python -m bench.api_load [--profile default|full] [--write docs/BENCHMARKS.md]
    python -m bench.api_load --scenario waiting [--mode embedded|postgres|both] [--write ...]

(`--scenario waiting` runs bench/api_waiting.py instead: open event streams, slow uploads and
tenant quotas, in a section of its own.)

A fresh PostgreSQL database (dropped at the end) is migrated with `python -m app.cli migrate`,
gets one tenant and API key (app.services.tenants.create_key) and is filled with COPY: jobs
with the resolved spec of examples/digits.json, mixed statuses (succeeded, failed, cancelled,
running, queued), their metrics, and the six job_stages rows each job of that spec has (the
list loads them for every page). VACUUM ANALYZE after every fill. The database grows through
three sizes, with the API restarted between them:

  1,000 jobs     the list: first page (`?limit=20`) and a deep page (`after=` the 31st-oldest
                 job: the same 20 jobs at every size, 971st-990th newest of 1,000)
  10,000 jobs    one job over a sample of 2,000 existing ids (8 connections, then 1), then
                 create a job with a tiny valid spec (app.testing.TINY_SPEC); with
                 1 API process, then with `--workers 2`
  100,000 jobs   the list again, the deep page now 99,971st-99,990th; EXPLAIN (ANALYZE) of the
                 statements one list request runs, captured from the service functions

Each load is `wrk --latency -t2 -c8` (or `-t1 -c1`) for a fixed time after an untimed warm-up
of the same requests; requests/s and p50/p99 come from wrk's own histogram (a Lua `done()`
hook prints them). wrk is closed-loop: each connection waits for its answer, so at 8
connections a latency includes queueing behind the other seven on a saturated server.

Target: the list stays flat. p50 and p99 of each page at 100,000 jobs at most 1.5x the same
page at 1,000, no sequential scan in the list's plans at 100,000, no failed request. The other
rows are reported, not judged. The exit status is 1 when the target is missed.

Created jobs go to a Redis queue of their own (no worker reads it), deleted at the end. The
`full` profile runs each load 20 s instead of 10 and loads the list with `--workers 2` too.
The default takes about 4 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.testing import (
    PG_ADMIN,
    REDIS_URL,
    TINY_SPEC,
    postgres_database,
)
from bench import api_waiting
from bench.common import REPO, command_line, load_average, markers, utc_now, write_section
from bench.servers import Server, api_server, base_env

NAME = "api_load"
START, END = markers(NAME)
TARGET_RATIO = 1.5  # list latency at 100k jobs over the same page at 1k, p50 and p99 alike
SMALL, MID, LARGE = 1_000, 10_000, 100_000
PAGE = 20
DEEP_RANK = 30  # the deep page starts after the 31st-oldest job: a full page and has_more
ID_SAMPLE = 2_000  # existing job ids GET /v1/jobs/{id} rotates over
STAGES = ("teacher", "baseline", "distill", "prune", "quantize", "export")  # digits.json's plan
STAGE_SECONDS = (28.0, 4.0, 4.6, 1.0, 0.06, 0.1)  # typical times of that plan on a CPU
STAGE_MODELS = {
    "teacher": "teacher",
    "baseline": "baseline",
    "distill": "student",
    "prune": "pruned",
    "quantize": "quantized",
}
STATUS_WEIGHTS = {"succeeded": 70, "failed": 8, "cancelled": 5, "running": 5, "queued": 12}
FAILURES = [
    ("nan_loss", "distill: loss is NaN at epoch 3 (lower the lr or the temperature)"),
    ("worker_lost", "no heartbeat for 60 s; gave up after 3 attempts"),
    ("dataset_incompatible", "student.arch: 'cnn_small' does not fit input [3, 32, 32]"),
]


@dataclass(frozen=True)
class Profile:
    seconds: int  # each timed wrk run
    rounds: int  # timed runs per cell, cells taking turns; medians are reported
    warmup: int  # the untimed run of each cell before the rounds
    threads: int
    connections: int
    lists_on_two: bool  # also load the list with `--workers 2`


PROFILES = {
    "default": Profile(seconds=6, rounds=3, warmup=3, threads=2, connections=8, lists_on_two=False),
    "full": Profile(seconds=15, rounds=3, warmup=5, threads=2, connections=8, lists_on_two=True),
}


# --- the database ----------------------------------------------------------------------------


@dataclass
class Db:
    name: str
    url: str  # SQLAlchemy, for the API and app.core.db
    conninfo: str  # psycopg
    tenant_id: str
    key: str
    jobs: int = 0  # the tenant's jobs now (the tenant owns every job)


@contextmanager
def fresh_database(pg_admin: str, env: dict[str, str]) -> Iterator[Db]:
    """A new database, migrated, with one tenant and its key; dropped afterwards."""
    from app.core.db import Database
    from app.models import Tenant
    from app.services import tenants

    with postgres_database(pg_admin, prefix="distillery_bench") as url:
        name = url.rsplit("/", 1)[1]
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            cwd=REPO,
            env={**env, "DATABASE_URL": url},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        database = Database(url)
        try:
            with database.session() as s:
                key = tenants.create_key(s, tenant_name="bench")
                tenant_id = s.query(Tenant.id).filter(Tenant.name == "bench").scalar()
        finally:
            database.dispose()
        yield Db(name, url, url.replace("postgresql+psycopg://", "postgresql://"), tenant_id, key)


JOB_COLUMNS = (
    "id, tenant_id, name, status, stage, progress, spec, metrics, error_code, error_message, "
    "queue, idempotency_key, request_hash, attempts, enqueued_at, worker_id, heartbeat_at, "
    "cancel_requested, created_at, started_at, finished_at, updated_at"
)
STAGE_COLUMNS = "job_id, name, status, started_at, finished_at, seconds, metrics, position"


def base_spec() -> dict[str, Any]:
    """examples/digits.json as the API stores it: resolved, every default filled in."""
    from worker.pipeline.spec import JobSpec

    raw = json.loads((REPO / "examples" / "digits.json").read_text())
    return JobSpec.model_validate(raw).model_dump(mode="json")


def model_metrics(rng: random.Random, model: str) -> dict[str, float]:
    size = {"teacher": 2_400_000, "quantized": 28_000}.get(model, 105_000)
    return {
        "accuracy": round(rng.uniform(0.95, 0.995), 4),
        "params": size // 4,
        "size_bytes": size + rng.randrange(2_000),
        "latency_ms": round(rng.uniform(0.05, 0.6), 4),
    }


def job_rows(
    rng: random.Random, k: int, tenant_id: str, spec: dict[str, Any], now: dt.datetime
) -> tuple[tuple, list[tuple]]:
    """Job number k (0 = oldest) and its six stage rows, as a finished worker leaves them."""
    job_id = f"job_{rng.getrandbits(80):020x}"
    status = rng.choices(list(STATUS_WEIGHTS), weights=list(STATUS_WEIGHTS.values()))[0]
    created = now - dt.timedelta(minutes=LARGE + SMALL - k)  # one a minute, newest last
    spec = {**spec, "name": f"digits-{k}", "seed": k % 5}
    spec_json = json.dumps(spec)
    # The stage that was running when the job stopped (all six done if it succeeded).
    reached = {"succeeded": 6, "queued": -1}.get(status, rng.randrange(6))
    stages, metrics, t = [], {}, created + dt.timedelta(seconds=0.05)
    started = t if reached >= 0 else None
    for pos, (name, typical) in enumerate(zip(STAGES, STAGE_SECONDS, strict=True)):
        if pos < reached:
            seconds = typical * rng.uniform(0.8, 1.3)
            end = t + dt.timedelta(seconds=seconds)
            done = {"method_int8_static": 1.0, "accuracy": 0.97} if name == "quantize" else {}
            stages.append((job_id, name, "succeeded", t, end, seconds, json.dumps(done), pos))
            if name in STAGE_MODELS:
                metrics[STAGE_MODELS[name]] = model_metrics(rng, STAGE_MODELS[name])
            t = end
        elif pos == reached:
            last = {"running": "running", "failed": "failed", "cancelled": "cancelled"}[status]
            end = None if status == "running" else t + dt.timedelta(seconds=1.5)
            stages.append((job_id, name, last, t, end, None, "{}", pos))
        else:
            stages.append((job_id, name, "pending", None, None, None, "{}", pos))
    if status == "succeeded":
        final = {**metrics["quantized"], "model": "quantized"}
        final["accuracy_drop"] = metrics["teacher"]["accuracy"] - final["accuracy"]
        final["size_ratio"] = metrics["teacher"]["size_bytes"] / final["size_bytes"]
        final["speedup"] = metrics["teacher"]["latency_ms"] / final["latency_ms"]
        final["distill_gain"] = metrics["student"]["accuracy"] - metrics["baseline"]["accuracy"]
        metrics["final"] = final
    error = rng.choice(FAILURES) if status == "failed" else (None, None)
    if status == "cancelled":
        error = ("cancelled", "cancelled by request")
    finished = None if status in ("queued", "running") else t + dt.timedelta(seconds=1.5)
    stage = None if reached < 0 else STAGES[min(reached, 5)]
    progress = 1.0 if status == "succeeded" else max(reached, 0) / 6
    heartbeat = finished or (now - dt.timedelta(seconds=2) if status == "running" else None)
    worker = f"worker-{1000 + k % 7}@bench" if started else None
    job = (
        job_id,
        tenant_id,
        spec["name"],
        status,
        stage,
        progress,
        spec_json,
        json.dumps(metrics),
        error[0],
        error[1],
        "default",
        f"ci-{k}" if k % 3 == 0 else None,  # a third of the clients send an Idempotency-Key
        hashlib.sha256(spec_json.encode()).hexdigest(),
        1 if started else 0,
        created + dt.timedelta(seconds=0.02),
        worker,
        heartbeat,
        status == "cancelled" and started is not None,
        created,
        started,
        finished,
        finished or heartbeat or created,
    )
    return job, stages


def grow(db: Db, target: int, seed: int = 0) -> float:
    """COPY jobs (and their stages) in until the tenant has `target`; VACUUM ANALYZE. Seconds."""
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(db.conninfo, autocommit=True) as conn:
        have = conn.execute("SELECT count(*) FROM jobs WHERE tenant_id = %s", [db.tenant_id])
        first = have.fetchone()[0]  # type: ignore[index]
        rng, spec, now = random.Random(seed + first), base_spec(), dt.datetime.now(dt.UTC)
        stages: list[tuple] = []
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY jobs ({JOB_COLUMNS}) FROM STDIN") as copy:
                for k in range(first, target):
                    job, rows = job_rows(rng, k, db.tenant_id, spec, now)
                    copy.write_row(job)
                    stages += rows
            with cur.copy(f"COPY job_stages ({STAGE_COLUMNS}) FROM STDIN") as copy:
                for row in stages:
                    copy.write_row(row)
        conn.execute("VACUUM (ANALYZE) jobs")
        conn.execute("VACUUM (ANALYZE) job_stages")
        db.jobs = count_jobs(db)
    return time.perf_counter() - started


def count_jobs(db: Db) -> int:
    import psycopg

    with psycopg.connect(db.conninfo) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE tenant_id = %s", [db.tenant_id])
        return row.fetchone()[0]  # type: ignore[index]


def sample_ids(db: Db, n: int) -> list[str]:
    import psycopg

    with psycopg.connect(db.conninfo) as conn:
        rows = conn.execute(
            "SELECT id FROM jobs WHERE tenant_id = %s ORDER BY random() LIMIT %s", [db.tenant_id, n]
        )
        return [r[0] for r in rows]


def deep_cursor(db: Db) -> str:
    """The id to page after for a full page near the end of the list (the oldest jobs)."""
    import psycopg

    with psycopg.connect(db.conninfo) as conn:
        row = conn.execute(
            "SELECT id FROM jobs WHERE tenant_id = %s ORDER BY seq LIMIT 1 OFFSET %s",
            [db.tenant_id, DEEP_RANK],
        ).fetchone()
        assert row is not None
        return row[0]


# --- the list's plans ------------------------------------------------------------------------


@dataclass
class Plan:
    what: str
    sql: str
    lines: list[str]

    @property
    def key_lines(self) -> list[str]:
        keep = ("Scan", "Limit", "Sort", "Execution Time")
        # The planner's cost estimates are noise next to what actually happened.
        lines = [re.sub(r"\s*\(cost=[^)]*\)", "", ln) for ln in self.lines]
        return [ln.strip() for ln in lines if any(k in ln for k in keep)]

    @property
    def execution_ms(self) -> float:
        for ln in self.lines:
            if m := re.search(r"Execution Time: ([\d.]+) ms", ln):
                return float(m.group(1))
        return float("nan")


def explain_list(db: Db, after: str | None) -> list[Plan]:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement one list request runs, captured from the
    service functions the route calls (auth, cursor lookup, page, stages)."""
    from sqlalchemy import event

    from app.core.db import Database
    from app.services import jobs as jobs_service
    from app.services import tenants

    database = Database(db.url)
    captured: list[tuple[str, Any]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _many) -> None:
        captured.append((statement, parameters))

    event.listen(database.engine, "before_cursor_execute", capture)
    try:
        with database.session() as s:
            tenant = tenants.authenticate(s, key=db.key)
            assert tenant is not None
            rows, _ = jobs_service.list_jobs(
                s, tenant_id=tenant.id, status=None, limit=PAGE, after=after
            )
            jobs_service.stages_of(s, job_ids=[j.id for j in rows])
            event.remove(database.engine, "before_cursor_execute", capture)
            names = ["auth", *(["cursor"] if after else []), "page", "stages"]
            if len(names) != len(captured):
                names = [f"statement {i + 1}" for i in range(len(captured))]
            plans = []
            for what, (sql, params) in zip(names, captured, strict=True):
                result = s.connection().exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                plans.append(Plan(what, " ".join(sql.split()), [r[0] for r in result]))
            return plans
    finally:
        database.dispose()


def explain_offset(db: Db, offset: int) -> Plan:
    """For contrast: the same deep page fetched with OFFSET, as the API does not do it."""
    import psycopg

    sql = "SELECT * FROM jobs WHERE tenant_id = %s ORDER BY seq DESC LIMIT %s OFFSET %s"
    with psycopg.connect(db.conninfo) as conn:
        rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, [db.tenant_id, PAGE, offset])
        return Plan("OFFSET page", sql, [r[0] for r in rows])


# --- wrk -------------------------------------------------------------------------------------

LUA_COMMON = """
wrk.headers["Authorization"] = "Bearer __KEY__"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, "p50_us": %.1f, '
    .. '"p90_us": %.1f, "p99_us": %.1f, "max_us": %.1f, "mean_us": %.1f, "connect": %.0f, '
    .. '"read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f}\\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

LUA_ROTATE = """
local ids = {__IDS__}
local n = 0
offset = 0  -- set per thread by setup(), so the two threads ask for different jobs
local threads = 0

function setup(thread)
  thread:set("offset", threads * 997)
  threads = threads + 1
end

function request()
  n = n + 1
  return wrk.format("GET", "/v1/jobs/" .. ids[((n + offset) % #ids) + 1])
end
"""

LUA_POST = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[__BODY__]==]
"""


@dataclass
class Load:
    """One cell (endpoint, database, API processes, connections) over its rounds: medians of
    the runs' requests/s, p50 and p99; the worst latency and the totals of all of them."""

    endpoint: str
    jobs: int  # the tenant's jobs when the cell's first run started
    workers: int
    connections: int
    runs: list[dict[str, float]]

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    @property
    def rps(self) -> float:
        return statistics.median(r["requests"] / (r["duration_us"] / 1e6) for r in self.runs)

    @property
    def p50_ms(self) -> float:
        return self.median("p50_us") / 1000

    @property
    def p99_ms(self) -> float:
        return self.median("p99_us") / 1000

    @property
    def max_ms(self) -> float:
        return max(r["max_us"] for r in self.runs) / 1000

    @property
    def requests(self) -> int:
        return int(sum(r["requests"] for r in self.runs))

    @property
    def kb_per_response(self) -> float:
        return sum(r["bytes"] for r in self.runs) / max(self.requests, 1) / 1024

    @property
    def failed(self) -> int:
        keys = ("connect", "read", "write", "status", "timeout")
        return int(sum(r[k] for r in self.runs for k in keys))


def lua(kind: str, key: str, ids: list[str] | None = None) -> str:
    script = LUA_COMMON.replace("__KEY__", key)
    if kind == "rotate":
        assert ids
        script += LUA_ROTATE.replace("__IDS__", ", ".join(json.dumps(i) for i in ids))
    elif kind == "post":
        script += LUA_POST.replace("__BODY__", json.dumps(TINY_SPEC))
    return script


def warmup_script(script: Path) -> Path:
    """The same requests on a new connection each: with `--workers 2` the kernel hands
    connections to whichever process accepts first, and keep-alive would pin all eight to
    one of them; this way every process gets warmed (the timed runs open their own)."""
    warm = script.with_name(f"warm-{script.name}")
    warm.write_text(script.read_text() + '\nwrk.headers["Connection"] = "close"\n')
    return warm


def wrk(
    url: str, script: Path, seconds: int, threads: int, connections: int, log: Path, timeout_s=10
) -> dict[str, float]:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        f"--timeout={timeout_s}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(line.removeprefix("WRK_JSON "))


def check(
    server: Server, key: str, method: str, path: str, spec: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One request by hand before loading it: the right status and a realistic body."""
    headers = {"Authorization": f"Bearer {key}"}
    body = (spec or TINY_SPEC) if method == "POST" else None
    r = httpx.request(method, server.url + path, headers=headers, json=body, timeout=120)
    want = 201 if method == "POST" else 200
    if r.status_code != want:
        raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
    data = r.json()
    if method == "POST":  # its stage rows follow the pipeline's plan for TINY_SPEC
        if not data["stages"]:
            raise RuntimeError(f"POST {path}: the new job has no stage rows")
        return data
    for job in data.get("data", [data]):  # the seeded jobs: six stage rows each
        if len(job["stages"]) != len(STAGES):
            raise RuntimeError(f"{method} {path}: job {job['id']} has {len(job['stages'])} stages")
    return data


# --- the run ---------------------------------------------------------------------------------

FIRST_PAGE = "list, first page"
DEEP_PAGE = "list, deep page"
GET_ONE = "one job"
POST_ONE = "create a job"
ORDER = [GET_ONE, POST_ONE, FIRST_PAGE, DEEP_PAGE]
POST_WARMUP_S = 8
PATHS = {
    FIRST_PAGE: f"GET /v1/jobs?limit={PAGE}",
    DEEP_PAGE: f"GET /v1/jobs?limit={PAGE}&after=<31st-oldest id>",
    GET_ONE: "GET /v1/jobs/{id}",
    POST_ONE: "POST /v1/jobs",
}


@dataclass
class Cell:
    """What one row of the table loads: an endpoint on one server, at one concurrency."""

    endpoint: str
    server: Server
    db: Db
    path: str | None  # None: the script picks each request's path
    script: Path
    connections: int
    spec: dict[str, Any] | None = None  # what a POST sends (TINY_SPEC unless said)

    def label(self) -> str:
        return f"{self.endpoint:<17} {self.db.jobs:>7,} jobs, {self.server.workers} proc, -c{self.connections}"


def run_cells(cells: list[Cell], profile: Profile, tmp: Path) -> list[Load]:
    """Check and warm every cell, then `profile.rounds` timed runs of each, the cells taking
    turns (forwards, then backwards) so that a drift in the machine's speed hits them alike."""
    loads = []
    for c in cells:
        method = "POST" if c.endpoint == POST_ONE else "GET"
        check(c.server, c.db.key, method, c.path or f"/v1/jobs/{sample_ids(c.db, 1)[0]}", c.spec)
        # The first POST in each API process imports torch and builds its first model.
        seconds = profile.warmup if method == "GET" else max(profile.warmup, POST_WARMUP_S)
        threads = min(profile.threads, c.connections)
        url = c.server.url + (c.path or "/")
        wrk(url, warmup_script(c.script), seconds, threads, c.connections, tmp / "wrk.log", 60)
        loads.append(Load(c.endpoint, count_jobs(c.db), c.server.workers, c.connections, []))
    for r in range(profile.rounds):
        turn = list(zip(cells, loads, strict=True))
        for c, load in turn if r % 2 == 0 else reversed(turn):
            threads = min(profile.threads, c.connections)
            url = c.server.url + (c.path or "/")
            result = wrk(url, c.script, profile.seconds, threads, c.connections, tmp / "wrk.log")
            load.runs.append(result)
            errors = {k: result[k] for k in ("connect", "read", "write", "status", "timeout")}
            print(
                f"  round {r + 1}/{profile.rounds} {c.label()}: "
                f"{result['requests'] / (result['duration_us'] / 1e6):7.1f} req/s, "
                f"p50 {result['p50_us'] / 1000:7.2f} ms, p99 {result['p99_us'] / 1000:7.2f} ms"
                + (f", ERRORS {errors}" if any(errors.values()) else ""),
                flush=True,
            )
    return loads


@dataclass
class Outcome:
    loads: list[Load] = field(default_factory=list)
    plans: dict[int, list[Plan]] = field(default_factory=dict)  # jobs -> deep-page plans
    first_plans: dict[int, list[Plan]] = field(default_factory=dict)
    offset_plan: Plan | None = None
    fill_s: dict[int, float] = field(default_factory=dict)

    def find(
        self, endpoint: str, jobs_at_least: int, workers: int = 1, connections: int | None = None
    ) -> Load:
        rows = [
            r
            for r in self.loads
            if r.endpoint == endpoint
            and r.workers == workers
            and r.jobs >= jobs_at_least
            and (connections is None or r.connections == connections)
        ]
        return min(rows, key=lambda r: (r.jobs, -r.connections))


def server_env(env: dict[str, str], db: Db, redis_url: str, queue: str, tmp: Path):
    return {
        **env,
        "DATABASE_URL": db.url,
        "BROKER_URL": redis_url,
        "DISTILLERY_HOME": str(tmp / f"home-{db.name}"),
        "DEFAULT_QUEUE": queue,
        "REAPER_INTERVAL_SECONDS": "86400",  # no reaper pass inside a timed run
        # The seeded tenant has ~1,700 queued or running jobs and wrk creates ~100 a second:
        # the job quotas would answer 429 (bench.api_waiting measures them).
        "TENANT_MAX_ACTIVE_JOBS": "0",
        "TENANT_MAX_SUBMISSIONS_PER_MINUTE": "0",
    }


def measure(profile: Profile, pg_admin: str, redis_url: str, tmp: Path) -> Outcome:
    """Two databases: `main` grows 10k -> 100k (one job and create a job at 10k, the list at
    100k), `small` holds 1k for the list to be compared with, loaded in turns with `main`."""
    import redis

    out = Outcome()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = base_env()
    c8 = profile.connections
    try:
        with ExitStack() as stack:
            main = stack.enter_context(fresh_database(pg_admin, env))
            small = stack.enter_context(fresh_database(pg_admin, env))
            for db, size in ((main, MID), (small, SMALL)):
                out.fill_s[size] = grow(db, size)
                print(f"{db.jobs:,} jobs in {db.name} ({out.fill_s[size]:.1f} s to fill)")

            ids, post = tmp / "ids.lua", tmp / "post.lua"
            ids.write_text(lua("rotate", main.key, sample_ids(main, ID_SAMPLE)))
            post.write_text(lua("post", main.key))
            with ExitStack() as servers:
                cells = []
                for workers in (1, 2):
                    log = tmp / f"api-{MID}-{workers}.log"
                    menv = server_env(env, main, redis_url, queue, tmp)
                    server = servers.enter_context(api_server(menv, workers, log))
                    cells += [
                        Cell(GET_ONE, server, main, None, ids, c8),
                        Cell(GET_ONE, server, main, None, ids, 1),  # a request's own time
                        Cell(POST_ONE, server, main, "/v1/jobs", post, c8),
                        Cell(POST_ONE, server, main, "/v1/jobs", post, 1),
                    ]
                out.loads += run_cells(cells, profile, tmp)

            out.fill_s[LARGE] = grow(main, LARGE)
            print(f"{main.jobs:,} jobs in {main.name} ({out.fill_s[LARGE]:.1f} s to fill)")
            with ExitStack() as servers:
                cells = []
                for workers in (1, 2) if profile.lists_on_two else (1,):
                    for db in (small, main):
                        log = tmp / f"api-{db.jobs}-{workers}.log"
                        denv = server_env(env, db, redis_url, queue, tmp)
                        server = servers.enter_context(api_server(denv, workers, log))
                        plain = tmp / f"plain-{db.name}.lua"
                        plain.write_text(lua("plain", db.key))
                        deep = f"/v1/jobs?limit={PAGE}&after={deep_cursor(db)}"
                        page = check(server, db.key, "GET", deep)
                        if len(page["data"]) != PAGE or not page["has_more"]:
                            raise RuntimeError(f"the deep page of {db.name}: {page}")
                        cells += [
                            Cell(FIRST_PAGE, server, db, f"/v1/jobs?limit={PAGE}", plain, c8),
                            Cell(DEEP_PAGE, server, db, deep, plain, c8),
                        ]
                # small and main side by side for each page, so that they alternate
                cells.sort(key=lambda c: (c.server.workers, ORDER.index(c.endpoint)))
                out.loads += run_cells(cells, profile, tmp)
            for db in (small, main):
                out.plans[db.jobs] = explain_list(db, deep_cursor(db))
                out.first_plans[db.jobs] = explain_list(db, None)
            out.offset_plan = explain_offset(main, main.jobs - DEEP_RANK)
    finally:
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(f"*{queue}*"):  # the queue and kombu's binding of it
            r.delete(k)
    return out


# --- the report ------------------------------------------------------------------------------


def load_table(out: Outcome) -> str:
    lines = [
        "| endpoint | request | jobs in DB | API processes | connections | requests/s "
        "| p50 (ms) | p99 (ms) | max (ms) | KB / response | requests | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted(
        out.loads, key=lambda r: (ORDER.index(r.endpoint), r.workers, r.jobs, -r.connections)
    )
    for r in rows:
        lines.append(
            f"| {r.endpoint} | `{PATHS[r.endpoint]}` | {r.jobs:,} | {r.workers} "
            f"| {r.connections} | {r.rps:.1f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.max_ms:.1f} | {r.kb_per_response:.1f} | {r.requests:,} "
            f"| {r.failed} |"
        )
    return "\n".join(lines)


def flat_rows(out: Outcome) -> list[tuple[str, Load, Load]]:
    return [
        (page, out.find(page, SMALL), out.find(page, LARGE)) for page in (FIRST_PAGE, DEEP_PAGE)
    ]


def flat_table(out: Outcome) -> str:
    lines = [
        "| page | p50 at 1k (ms) | p50 at 100k (ms) | p50 ratio | p99 at 1k (ms) "
        "| p99 at 100k (ms) | p99 ratio | requests/s 1k -> 100k |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for page, a, b in flat_rows(out):
        lines.append(
            f"| {page} | {a.p50_ms:.2f} | {b.p50_ms:.2f} | {b.p50_ms / a.p50_ms:.2f}x "
            f"| {a.p99_ms:.2f} | {b.p99_ms:.2f} | {b.p99_ms / a.p99_ms:.2f}x "
            f"| {a.rps:.1f} -> {b.rps:.1f} |"
        )
    return "\n".join(lines)


def seq_scans(out: Outcome) -> list[str]:
    large = max(out.plans)
    plans = out.plans[large] + out.first_plans[large]
    return [f"{p.what}: {ln}" for p in plans for ln in p.lines if "Seq Scan" in ln]


def verdict(out: Outcome) -> tuple[bool, str]:
    ratios = []
    for page, a, b in flat_rows(out):
        ratios.append((f"{page} p50", b.p50_ms / a.p50_ms))
        ratios.append((f"{page} p99", b.p99_ms / a.p99_ms))
    scans = seq_scans(out)
    errors = sum(r.failed for r in out.loads)
    ok = all(x <= TARGET_RATIO for _, x in ratios) and not scans and errors == 0
    measured = ", ".join(f"{name} {x:.2f}x" for name, x in ratios)
    return ok, (
        f"Target: each list page's p50 and p99 at 100k jobs <= {TARGET_RATIO}x the same page "
        f"at 1k, no Seq Scan in the list's plans at 100k, no failed request. Measured: "
        f"{measured}; {len(scans)} Seq Scan(s); {errors} failed request(s) -> "
        f"**{'PASS' if ok else 'FAIL'}**"
    )


def plan_block(out: Outcome) -> str:
    large = max(out.plans)
    lines = []
    for title, plans in (("deep page", out.plans[large]), ("first page", out.first_plans[large])):
        for p in plans:
            if p.what == "auth" and title == "first page":
                continue
            lines.append(f"-- {title}, {p.what}: {p.sql}")
            lines += [f"   {ln}" for ln in p.key_lines]
    if out.offset_plan is not None:
        p = out.offset_plan
        lines.append(f"-- for contrast, the deep page by OFFSET (not what the API runs): {p.sql}")
        lines += [f"   {ln}" for ln in p.key_lines]
    return "\n".join(["```", *lines, "```"])


def tool_version() -> str:
    proc = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return (proc.stdout + proc.stderr).splitlines()[0].split(" Copyright")[0].strip()


def software(pg_admin: str, redis_url: str) -> str:
    """The server side's versions: what a reader needs to compare these numbers."""
    import fastapi
    import psycopg
    import redis
    import sqlalchemy
    import uvicorn

    with psycopg.connect(pg_admin) as conn:
        pg = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        buffers = conn.execute("SHOW shared_buffers").fetchone()[0]  # type: ignore[index]
    server = redis.Redis.from_url(redis_url).info("server")["redis_version"]
    return ", ".join(
        [
            f"Python {platform.python_version()}",
            f"uvicorn {uvicorn.__version__}",
            f"FastAPI {fastapi.__version__}",
            f"SQLAlchemy {sqlalchemy.__version__}",
            f"psycopg {psycopg.__version__}",
            f"PostgreSQL {pg.split()[0]} (shared_buffers {buffers}), Redis {server}",
        ]
    )


def notes(out: Outcome) -> list[str]:
    """What the rows say beyond themselves, from this run's numbers."""
    lines = []
    c = max(r.connections for r in out.loads)
    one, two = out.find(GET_ONE, MID, 1, 1), out.find(GET_ONE, MID, 2, 1)
    many, many2 = out.find(GET_ONE, MID, 1, c), out.find(GET_ONE, MID, 2, c)
    post, post2 = out.find(POST_ONE, MID, 1, c), out.find(POST_ONE, MID, 2, c)
    lines.append(
        f"- `--workers 2` against 1 process, {c} connections: one job "
        f"{many2.rps / many.rps:.2f}x the requests/s, create a job {post2.rps / post.rps:.2f}x "
        "(2 CPUs shared with PostgreSQL and wrk)."
    )
    if two.p50_ms > max(20.0, 5 * one.p50_ms):
        lines.append(
            f"- With `--workers 2` a lone request takes {two.p50_ms:.0f} ms at p50 against "
            f"{one.p50_ms:.1f} ms with one process: a fixed wait on every keep-alive "
            "response, the signature of Kludex/uvicorn#3149 (the supervisor binds the shared "
            "socket with proto 0, so asyncio never sets TCP_NODELAY on accepted connections "
            "and Nagle waits for the client's delayed ACK). `distillery api` binds that socket "
            "itself to avoid this (`app.cli.listen_socket`), so seeing it means that fix "
            "regressed."
        )
    else:
        lines.append(
            f"- A lone request takes {two.p50_ms:.1f} ms at p50 with `--workers 2` and "
            f"{one.p50_ms:.1f} ms with one process: no fixed ~40 ms wait, because "
            "`distillery api` binds the shared socket itself with TCP_NODELAY "
            "(`app.cli.listen_socket`; uvicorn's own socket lacks it, Kludex/uvicorn#3149)."
        )
    lines.append(
        "- One tenant owns every row, so for the page the planner walks the primary key on "
        "`seq` backwards and the `tenant_id` filter drops nothing; either way the cursor "
        "makes it a range scan that stops after 21 rows, where OFFSET reads every row it "
        "skips (last line of the plans)."
    )
    return lines


def section(
    command: str,
    profile_name: str,
    profile: Profile,
    out: Outcome,
    where: str,
    versions: str,
    loads: tuple[str, str],
) -> str:
    _, line = verdict(out)
    fills = ", ".join(f"{n:,} in {s:.1f} s" for n, s in sorted(out.fill_s.items()))
    return "\n".join(
        [
            START,
            "## API under load: one job, create a job, and the job list at 1k vs 100k jobs",
            "",
            "The real server (`python -m app.cli api`: uvicorn, one process, or two with "
            "`--workers 2` where the table says so) on loopback, with PostgreSQL and Redis on "
            "the same machine, loaded by wrk. wrk keeps its own numbers: requests/s is the "
            "server's throughput at that many connections, p50/p99 come from its latency "
            "histogram. wrk is closed-loop: with 8 connections each latency includes the wait "
            "behind the other connections' requests on a saturated server (p50 is about 8 / "
            "requests/s); the 1-connection rows are a request's own time. wrk, the API and "
            "PostgreSQL share the 2 CPUs. **one job** rotates over 2,000 random existing job "
            "ids. **create a job** sends `app.testing.TINY_SPEC`: each is validated "
            "(the student and the teacher are built on PyTorch's meta device, once per API process "
            "for each arch and input shape, then the verdict is cached), stored with "
            "its stage rows and an event, and enqueued to Redis after the commit. The **deep "
            f"page** is `after=` the 31st-oldest job: jobs {SMALL - 29:,}-{SMALL - 10:,} of "
            f"{SMALL:,} newest first, {LARGE - 29:,}-{LARGE - 10:,} of {LARGE:,}, the same "
            "20 jobs at both sizes.",
            "",
            "Every row is a cell run in rounds: all cells of a group are started together "
            "(one job and create a job at 10k on 1 and 2 processes; the list on the 1k and "
            "the 100k database), each is warmed once, then each runs once per round, the "
            "cells taking turns (forwards, then backwards), so that a change in the shared "
            "machine's speed hits all of them alike. Requests/s, p50 and p99 are medians over "
            "the rounds, max the worst of them, requests their total.",
            "",
            f"- Command: `{command}`",
            f"- Machine: {where}",
            f"- Software: {versions}",
            f"- Date: {utc_now()}",
            f"- Load average (1, 5, 15 min; 2 CPUs shared with other users) at the start: "
            f"{loads[0]}; at the end: {loads[1]}",
            f"- Tool: {tool_version()}, `-t{profile.threads} -c{profile.connections} "
            f"-d{profile.seconds}s --latency` (`-t1 -c1` for the 1-connection rows), "
            f"{profile.rounds} rounds, a Lua `done()` hook printing the percentiles; warm-up "
            f"{profile.warmup} s per cell ({max(profile.warmup, POST_WARMUP_S)} s for create: "
            "each API process imports torch and builds its first model on its first), on a "
            f"new connection per request so that every API process gets some; profile "
            f"`{profile_name}`",
            "- Data: two fresh databases (`python -m app.cli migrate`), each with one tenant "
            "owning every job; jobs COPYed in with examples/digits.json's resolved spec "
            "(about 1 KB of JSON), metrics as a worker leaves them and six job_stages rows "
            "each (the list loads them for every page); about 70% succeeded, 12% queued, 8% "
            "failed, 5% running, 5% cancelled; VACUUM ANALYZE after each fill "
            f"({fills}). One holds {SMALL:,} jobs; the other {MID:,} for one job and create "
            "a job (create adds jobs: the counts are at each cell's first run), then topped "
            f"up to {LARGE:,} for the list.",
            "- API settings: defaults (uvicorn access log on, API_THREADS=40 and a SQLAlchemy "
            "pool sized from them, 10 + 35, TENANT_MAX_REQUESTS=20 above the 8 connections), "
            "TENANT_MAX_ACTIVE_JOBS=0 and TENANT_MAX_SUBMISSIONS_PER_MINUTE=0 (off: the "
            "tenant's ~1,700 queued and running jobs, and wrk's submissions, are over their "
            "defaults), "
            "REAPER_INTERVAL_SECONDS=86400 so that no reaper pass lands in a run, "
            "OMP_NUM_THREADS=1",
            "",
            load_table(out),
            "",
            *notes(out),
            "",
            "The list at 1k against 100k jobs (1 API process, 8 connections):",
            "",
            flat_table(out),
            "",
            f"Plans at {max(out.plans):,} jobs: `EXPLAIN (ANALYZE, BUFFERS)` of each statement "
            "one list request runs, captured from `tenants.authenticate`, "
            "`app.services.jobs.list_jobs` and `stages_of` as the routes call them (key lines):",
            "",
            plan_block(out),
            "",
            line,
            END,
        ]
    )


def bench(
    profile: str,
    write: Path | None,
    *,
    pg_admin: str = PG_ADMIN,
    redis_url: str = REDIS_URL,
    keep_logs: bool = False,
) -> bool:
    """Run the whole benchmark, print the tables, write the section; True when it passes."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    chosen = PROFILES[profile]
    # What the API processes get too; set before bench.common.machine() imports torch.
    os.environ.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    tmp = Path(tempfile.mkdtemp(prefix="distillery-api-load-"))
    started_load = load_average()
    try:
        out = measure(chosen, pg_admin, redis_url, tmp)
    finally:
        if keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(load_table(out))
    print()
    print(flat_table(out))
    print()
    print(plan_block(out))
    ok, line = verdict(out)
    print(line.replace("**", ""))
    loads = (started_load, load_average())
    print(f"load average: {loads[0]} -> {loads[1]}")
    if write is not None:
        from bench.common import machine  # imports torch: only now, the servers are gone

        versions = software(pg_admin, redis_url)
        body = section(command_line(), profile, chosen, out, machine(), versions, loads)
        write_section(write, NAME, body)  # re-reads the file: other sections survive
        print(f"wrote {write}")
    return ok


def run(profile: str, write: Path | None) -> bool:
    """Run the benchmark with `profile` ("default" or "full"), print its tables, and when
    `write` is given rewrite its section there. True when the list stays flat; raises when
    something kept it from measuring (wrk missing, PostgreSQL or Redis down, a bad answer)."""
    return bench(profile, write)


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: server, DB, Redis


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__)
    parser.add_argument(
        "--scenario",
        choices=["rows", "waiting"],
        default="rows",
        help="rows: the wrk rows above; waiting: open streams, slow uploads and quotas "
        "(bench/api_waiting.py, its own section)",
    )
    parser.add_argument("--profile", choices=list(PROFILES), default="default")
    api_waiting.add_arguments(parser)
    parser.add_argument("--pg-admin", default=PG_ADMIN, help="a database to CREATE DATABASE from")
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--keep-logs", action="store_true", help="keep the API and wrk logs")
    parser.add_argument("--write", type=Path, help="(re)write the result section in this file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    if args.scenario == "waiting":
        ok = api_waiting.bench(
            args.profile,
            args.write,
            modes=api_waiting.modes(args.mode),
            pg_admin=args.pg_admin,
            redis_url=args.redis_url,
            keep_logs=args.keep_logs,
        )
        return 0 if ok else 1
    ok = bench(
        args.profile,
        args.write,
        pg_admin=args.pg_admin,
        redis_url=args.redis_url,
        keep_logs=args.keep_logs,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
