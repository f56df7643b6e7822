"""What a bucket as the store costs: a whole job with `STORAGE_URL=s3://…` against the local
folder, and how fast a big artifact comes down through the API against straight from the store.

    python -m bench.storage [--repeats R] [--download-repeats D] [--artifact-mb MB]
        [--threads T] [--spec examples/digits.json] [--write docs/BENCHMARKS.md]

Two distributed stacks, each `python -m app.cli api` + one `worker` on a fresh PostgreSQL
database and Redis (a queue of its own), up side by side and idle while the other works:

  local   STORAGE_DIR, a folder API and worker share (one host)
  s3      STORAGE_URL=s3://<bucket>/<prefix> on moto's standalone server (`moto_server`) on
          loopback; the API and the worker each on a "host" of their own (working directory
          and DISTILLERY_HOME), sharing nothing but the bucket

Whole job: the spec R times on each stack, in the order local, s3, s3, local, … (drift on a
shared machine hits both alike), after an untimed tiny job on each that warms the worker.
Time is POST -> `succeeded` as the client sees it, polling every 0.2 s. The s3 worker runs the
real worker with every S3Storage call timed (`timed_worker`, a wrapper, not a change to the
code): the job's store transfers (pull, checkpoint pushes, artifact publish) are summed from
that trace. Target: s3 / local at most 1.05x (medians).

Download: a `--artifact-mb` file of random bytes (default 200 MB) becomes an artifact of a
finished job on each stack (its object or file put in place, its artifacts row inserted, as
the worker's publish would leave them). Each way to fetch it runs D times, the ways taking
turns; each writes a file, and the time includes checking its sha256 (the distillery Client
checks it itself; the others hash the file after it is written, the same work):

  client, redirect    distillery Client.download: GET -> 307 -> presigned URL on the store
  API, streamed       GET ...?redirect=false through the API (the API reads the object)
  store, get_object   boto3 get_object, one stream (what the API does, without the API)
  store, download_file boto3 download_file: parallel ranged GETs (boto3's defaults)
  local folder, API   the local stack's API serving its folder (FileResponse)

moto keeps objects in memory and serves them from Python: absolute numbers describe moto on
this machine, not S3, and client, API and moto share the same cores.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.testing import PG_ADMIN, REDIS_URL, TINY_SPEC, free_port, postgres_database, stop_group
from bench.common import REPO, command_line, machine, markers, utc_now, write_section
from bench.service_overhead import (
    api_ready,
    base_env,
    stage_seconds,
    submit,
    ts,
    wait_done,
    wait_for,
    worker_ready,
)

NAME = "storage"
START, END = markers(NAME)
TARGET_RATIO = 1.05  # a job on the bucket at most 1.05x the same job on the local folder
BUCKET = "distillery-bench"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BLOB = "bench-blob.bin"  # the big artifact's name
CHUNK = 1 << 20  # what the distillery Client reads at a time; the others do the same
TRACED = ("put_file", "get_file", "list", "size", "delete_prefix")
WORKER_SHIM = "from bench.storage import timed_worker; timed_worker()"


# --- the timed worker ------------------------------------------------------------------------


def timed_worker() -> None:
    """`python -c WORKER_SHIM worker -Q …`: the distillery CLI, with every S3Storage call
    appended to $BENCH_STORE_TRACE as a JSON line (op, key, bytes, seconds)."""
    from app.core.storage import S3Storage
    from distillery.cli import main as cli_main

    trace = Path(os.environ["BENCH_STORE_TRACE"])
    for op in TRACED:
        setattr(S3Storage, op, _timed(getattr(S3Storage, op), op, trace))
    cli_main()


def _timed(fn: Callable[..., Any], op: str, trace: Path) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(self, key: str, *args: Any, **kwargs: Any) -> Any:
        sent = Path(args[0]).stat().st_size if op == "put_file" else 0
        started = time.perf_counter()
        try:
            return fn(self, key, *args, **kwargs)
        finally:
            seconds = time.perf_counter() - started
            got = Path(args[0]).stat().st_size if op == "get_file" and Path(args[0]).exists() else 0
            line = {"op": op, "key": key, "bytes": sent + got, "seconds": seconds}
            with open(trace, "a") as f:
                f.write(json.dumps(line) + "\n")

    return timed


def transfers(trace: Path, job_id: str) -> list[dict[str, Any]]:
    """The traced store calls on job `job_id`'s keys."""
    if not trace.exists():
        return []
    lines = (json.loads(line) for line in trace.read_text().splitlines() if line)
    return [t for t in lines if f"jobs/{job_id}" in t["key"]]


# --- the store and the stacks ----------------------------------------------------------------


@dataclass
class Store:
    url: str
    prefix: str
    client: Any  # boto3's S3 client
    pid: int  # moto_server's process (group)

    def env(self) -> dict[str, str]:
        """What every process of the s3 stack is told: the standard AWS variables."""
        return {
            "STORAGE_URL": f"s3://{BUCKET}/{self.prefix}",
            "AWS_ENDPOINT_URL": self.url,
            **CREDENTIALS,
        }

    def key(self, job_id: str, name: str) -> str:
        return f"{self.prefix}/jobs/{job_id}/{name}"


@contextmanager
def moto_store(tmp: Path) -> Iterator[Store]:
    """moto's standalone server on a free loopback port, with an empty bucket."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        raise RuntimeError(f"{server} is missing: pip install 'moto[server]'")
    with open(tmp / "moto.log", "wb") as log:
        proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for("moto_server", lambda: _answers(url), [proc], tmp / "moto.log", timeout=60)
        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=BUCKET)
        yield Store(url, f"bench-{uuid.uuid4().hex[:8]}", client, proc.pid)
    finally:
        stop_group(proc)


def _answers(url: str) -> bool:
    with suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


@dataclass
class Stack:
    name: str  # local | s3
    url: str
    key: str
    db_url: str
    storage_dir: Path | None  # the local folder; None on a bucket
    trace: Path  # the worker's store calls (empty for the local folder)
    detail: str
    groups: dict[str, int]  # process groups whose CPU time a job's row reports: api, worker, …


def spawn(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A process of a stack on `cwd`'s "host", in a session of its own (stop_group)."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextmanager
def stack(name: str, tmp: Path, env: dict[str, str], pg_admin: str, redis_url: str):
    """`api` and one timed worker for `name`; `env` says where the store is. On the bucket
    each process gets a host of its own; on the local folder they share one."""
    import redis

    queue = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    hosts = (tmp / f"{name}-api-host", tmp / f"{name}-worker-host")
    if name == "local":
        hosts = (tmp / "local-host",) * 2
    env = {
        **env,
        "PYTHONPATH": str(REPO),  # this checkout, from a host's own working directory
        "BROKER_URL": redis_url,
        "DISTILLERY_API_KEY": "dk_bench_" + uuid.uuid4().hex,
        "DEFAULT_QUEUE": queue,
        "BENCH_STORE_TRACE": str(tmp / f"{name}-store-trace.jsonl"),
    }
    try:
        with ExitStack() as cleanup:
            env["DATABASE_URL"] = cleanup.enter_context(
                postgres_database(pg_admin, prefix="distillery_bench")
            )
            logs = tmp / f"{name}-api.log", tmp / f"{name}-worker.log"
            api_env = {**env, "DISTILLERY_HOME": str(hosts[0] / "home")}
            api = spawn(["-m", "app.cli", "api", "--port", str(port)], api_env, hosts[0], logs[0])
            cleanup.callback(stop_group, api)
            wait_for(f"the {name} API", lambda: api_ready(url), [api], logs[0])
            worker_env = {**env, "DISTILLERY_HOME": str(hosts[1] / "home")}
            worker = spawn(
                ["-c", WORKER_SHIM, "worker", "-Q", queue], worker_env, hosts[1], logs[1]
            )
            cleanup.callback(stop_group, worker)
            wait_for(f"the {name} worker", lambda: worker_ready(logs[1]), [worker], logs[1])
            yield Stack(
                name,
                url,
                env["DISTILLERY_API_KEY"],
                env["DATABASE_URL"],
                Path(env["STORAGE_DIR"]) if "STORAGE_DIR" in env else None,
                Path(env["BENCH_STORE_TRACE"]),
                _detail(name),
                {"api": api.pid, "worker": worker.pid},
            )
    finally:
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(f"*{queue}*"):  # the queue and kombu's bindings of it
            r.delete(k)


def _detail(name: str) -> str:
    if name == "local":
        return "local: `api` + one `worker` sharing STORAGE_DIR (one host)"
    return (
        "s3: `api` + one `worker`, each with a working directory and DISTILLERY_HOME of its own, "
        "STORAGE_URL=s3://… on `moto_server` (loopback), everything else at its defaults "
        "(CHECKPOINT_SYNC_SECONDS=60, S3_MULTIPART_BYTES=64 MiB, DOWNLOAD_MODE=redirect)"
    )


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) so far of the live processes in process group `pgid`."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # pgrp; utime and stime are fields 14 and 15
                total += int(fields[11]) + int(fields[12])
    return total / tick


def http(s: Stack) -> httpx.Client:
    return httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {s.key}"}, timeout=120)


# --- whole job -------------------------------------------------------------------------------


@dataclass
class JobRun:
    job_id: str
    observed_s: float  # just before the POST -> the poll that saw `succeeded`
    worker_s: float  # started_at -> finished_at
    pipeline_s: float  # report.json wall_seconds (run_pipeline, checkpoint pushes included)
    stages: dict[str, float]
    worker_cpu_s: float  # the worker process's CPU time over the job
    side_cpu_s: float  # the stack's other processes (API; on s3 moto_server too)
    store_s: float = 0.0  # the worker's store calls on this job's keys
    store_calls: int = 0
    store_bytes: int = 0


def run_job(s: Stack, spec: dict[str, Any]) -> JobRun:
    with http(s) as c:
        cpu = {name: group_cpu(pgid) for name, pgid in s.groups.items()}
        t0, _, job_id = submit(c, spec)
        job, seen = wait_done(c, job_id, timeout=3600)
        cpu = {name: group_cpu(pgid) - cpu[name] for name, pgid in s.groups.items()}
        r = c.get(f"/v1/jobs/{job_id}/artifacts/report.json", params={"redirect": "false"})
        r.raise_for_status()
        report = r.json()
    calls = transfers(s.trace, job_id)
    return JobRun(
        job_id=job_id,
        observed_s=seen - t0,
        worker_s=ts(job["finished_at"]) - ts(job["started_at"]),
        pipeline_s=float(report["wall_seconds"]),
        stages=stage_seconds(report),
        worker_cpu_s=cpu.pop("worker"),
        side_cpu_s=sum(cpu.values()),
        store_s=sum(t["seconds"] for t in calls),
        store_calls=len(calls),
        store_bytes=sum(t["bytes"] for t in calls),
    )


def measure_jobs(stacks: dict[str, Stack], spec: dict[str, Any], repeats: int) -> dict:
    runs: dict[str, list[JobRun]] = {name: [] for name in stacks}
    for s in stacks.values():  # untimed: the worker's first job pays lazy imports
        run_job(s, TINY_SPEC)
    for r in range(repeats):
        order = ("local", "s3") if r % 2 == 0 else ("s3", "local")
        for name in order:
            run = run_job(stacks[name], spec)
            runs[name].append(run)
            print(
                f"  job {r + 1}/{repeats} {name:5}: POST->succeeded {run.observed_s:6.2f} s "
                f"(worker {run.worker_s:.2f}, its CPU {run.worker_cpu_s:.2f}, API/store CPU "
                f"{run.side_cpu_s:.2f}, run_pipeline {run.pipeline_s:.2f}, store calls "
                f"{run.store_calls} taking {run.store_s:.2f} s, {run.store_bytes / 1e6:.1f} MB)",
                flush=True,
            )
    return runs


def med(runs: list[JobRun], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def job_ratio(runs: dict[str, list[JobRun]]) -> float:
    return med(runs["s3"], "observed_s") / med(runs["local"], "observed_s")


# --- download --------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def make_blob(path: Path, size: int) -> str:
    """`size` random bytes (incompressible, nothing on the way can shortcut them); the sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for at in range(0, size, 8 * CHUNK):
            chunk = os.urandom(min(8 * CHUNK, size - at))
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def add_artifact_row(s: Stack, job_id: str, size: int, sha: str) -> None:
    """The artifacts row the worker's publish would have recorded for the blob."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.models import Artifact

    engine = create_engine(s.db_url)
    try:
        with Session(engine) as session, session.begin():
            session.add(
                Artifact(
                    job_id=job_id,
                    name=BLOB,
                    format="bin",
                    bytes=size,
                    sha256=sha,
                    path=f"jobs/{job_id}/{BLOB}",
                )
            )
    finally:
        engine.dispose()


def place_blob(
    stacks: dict[str, Stack], jobs: dict[str, str], store: Store, blob: Path, sha: str
) -> None:
    """Put the blob in as an artifact of a finished job on each stack."""
    size = blob.stat().st_size
    store.client.upload_file(str(blob), BUCKET, store.key(jobs["s3"], BLOB))
    local = stacks["local"].storage_dir / "jobs" / jobs["local"] / BLOB
    shutil.copyfile(blob, local)
    for name, s in stacks.items():
        add_artifact_row(s, jobs[name], size, sha)


def fetch_client(s: Stack, job_id: str, dest: Path) -> tuple[Path, str | None]:
    from distillery import Client

    with Client(s.url, s.key) as client:
        # None: Client.download checked the sha256 itself (inside the timing) or raised.
        return client.download(job_id, BLOB, dest), None


def fetch_api(s: Stack, job_id: str, dest: Path) -> tuple[Path, str]:
    path = dest / BLOB
    with (
        http(s) as c,
        c.stream("GET", f"/v1/jobs/{job_id}/artifacts/{BLOB}", params={"redirect": "false"}) as r,
    ):
        if r.status_code != 200:
            raise RuntimeError(f"streamed download: {r.status_code} {r.read()[:300]!r}")
        with open(path, "wb") as f:
            for chunk in r.iter_bytes(CHUNK):
                f.write(chunk)
    return path, sha256_file(path)


def fetch_get_object(store: Store, key: str, dest: Path) -> tuple[Path, str]:
    path = dest / BLOB
    body = store.client.get_object(Bucket=BUCKET, Key=key)["Body"]
    with open(path, "wb") as f:
        for chunk in body.iter_chunks(CHUNK):
            f.write(chunk)
    return path, sha256_file(path)


def fetch_download_file(store: Store, key: str, dest: Path) -> tuple[Path, str]:
    path = dest / BLOB
    store.client.download_file(BUCKET, key, str(path))
    return path, sha256_file(path)


def download_ways(
    stacks: dict[str, Stack], jobs: dict[str, str], store: Store
) -> dict[str, Callable[[Path], tuple[Path, str | None]]]:
    s3, key = stacks["s3"], store.key(jobs["s3"], BLOB)
    return {
        "client, redirect": lambda d: fetch_client(s3, jobs["s3"], d),
        "API, streamed": lambda d: fetch_api(s3, jobs["s3"], d),
        "store, get_object": lambda d: fetch_get_object(store, key, d),
        "store, download_file": lambda d: fetch_download_file(store, key, d),
        "local folder, API": lambda d: fetch_api(stacks["local"], jobs["local"], d),
    }


def measure_downloads(ways: dict, sha: str, tmp: Path, repeats: int) -> dict[str, list[float]]:
    """Each way `repeats` times, the ways taking turns; every download's sha256 checked."""
    times: dict[str, list[float]] = {w: [] for w in ways}
    names = list(ways)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            dest = Path(tempfile.mkdtemp(dir=tmp, prefix="dl-"))
            started = time.perf_counter()
            path, got = ways[name](dest)
            times[name].append(time.perf_counter() - started)
            if (got or sha256_file(path)) != sha:
                raise RuntimeError(f"{name}: the download's sha256 does not match")
            shutil.rmtree(dest)
            print(f"  download {r + 1}/{repeats} {name:22}: {times[name][-1]:6.2f} s", flush=True)
    return times


def hash_seconds(blob: Path) -> float:
    """sha256 of the blob alone (from the page cache): the part of each time that is not
    transfer."""
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        sha256_file(blob)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


# --- the report ------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    body = f"{statistics.median(values):.2f}"
    return body + (f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else "")


def job_table(runs: dict[str, list[JobRun]]) -> str:
    lines = [
        "| store | POST->succeeded (s) | worker: started->finished (s) | run_pipeline (s) "
        "| worker CPU (s) | API (+ moto) CPU (s) | store calls on the job | their time (s) "
        "| share of the worker's time | bytes moved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in runs.items():
        share = 100 * med(rs, "store_s") / med(rs, "worker_s")
        lines.append(
            f"| {name} | {_spread([r.observed_s for r in rs])} | {_spread([r.worker_s for r in rs])} "
            f"| {_spread([r.pipeline_s for r in rs])} | {med(rs, 'worker_cpu_s'):.2f} "
            f"| {med(rs, 'side_cpu_s'):.2f} | {med(rs, 'store_calls'):.0f} "
            f"| {med(rs, 'store_s'):.2f} | {share:.1f}% | {med(rs, 'store_bytes') / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


def stage_table(runs: dict[str, list[JobRun]]) -> str:
    names = list(dict.fromkeys(n for rs in runs.values() for r in rs for n in r.stages))
    head = "| stage | " + " | ".join(f"{n} (s)" for n in runs) + " |"
    lines = [head, "|---|" + "---:|" * len(runs)]
    for stage in names:
        cells = [
            f"{statistics.median(r.stages[stage] for r in rs if stage in r.stages):.2f}"
            for rs in runs.values()
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def download_table(times: dict[str, list[float]], size: int, base: str) -> str:
    lines = [
        f"| way | time to a checked file (s) | MB/s | vs {base} |",
        "|---|---:|---:|---:|",
    ]
    base_s = statistics.median(times[base])
    for name, ts_ in times.items():
        median = statistics.median(ts_)
        lines.append(
            f"| {name} | {_spread(ts_)} | {size / 1e6 / median:.0f} | {base_s / median:.2f}x |"
        )
    return "\n".join(lines)


def paired_ratios(runs: dict[str, list[JobRun]]) -> list[float]:
    """Each round's s3 run over its local run, the two back to back: on a shared machine
    these drift less than the medians of either side."""
    return [s.observed_s / lo.observed_s for s, lo in zip(runs["s3"], runs["local"], strict=True)]


def verdict(runs: dict[str, list[JobRun]]) -> tuple[bool, str]:
    ratio = job_ratio(runs)
    ok = ratio <= TARGET_RATIO
    paired = ", ".join(f"{r:.3f}" for r in paired_ratios(runs))
    return ok, (
        f"Target: a whole job's POST->succeeded on the bucket at most {TARGET_RATIO}x the same "
        f"job on the local folder (medians). Measured: {ratio:.3f}x -> "
        f"**{'PASS' if ok else 'FAIL'}** (round by round, s3 over the local run beside it: "
        f"{paired})"
    )


@dataclass
class Results:
    runs: dict[str, list[JobRun]]
    downloads: dict[str, list[float]] = field(default_factory=dict)
    blob_bytes: int = 0
    hash_s: float = 0.0


def section(command: str, setup: str, details: list[str], res: Results, machine: str) -> str:
    _, line = verdict(res.runs)
    mb = res.blob_bytes / 1e6
    return "\n".join(
        [
            START,
            "## Storage: a whole job on a bucket, and downloading a big artifact",
            "",
            "What `STORAGE_URL=s3://…` costs against the local folder, with real processes: two "
            "distributed stacks (`api` + one `worker`, PostgreSQL and Redis), one on a local "
            "folder, one on a bucket served by moto's standalone server on loopback with API "
            "and worker on hosts of their own (own working directory and DISTILLERY_HOME: they "
            "share only the bucket). **Whole job**: the spec through each stack, alternating "
            "(local, s3, s3, local, …), POST until a poll every 0.2 s sees `succeeded`; an "
            "untimed tiny job warmed each worker first. The s3 worker's store calls (pull, "
            "checkpoint pushes at each stage's end, the artifacts' publish) are timed inside "
            "the worker by a wrapper around `S3Storage` (`bench.storage.timed_worker`).",
            "",
            f"**Download**: a {mb:.0f} MB file of random bytes put in as an artifact of a finished "
            "job on each stack (the object or file written, an artifacts row inserted, as the "
            "worker's publish leaves them), fetched by each way in turn; each time runs to a "
            "file on disk whose sha256 was checked (the distillery Client checks it itself; "
            "the other ways hash the file after writing it, the same work). "
            f"Hashing {mb:.0f} MB alone takes {res.hash_s:.2f} s here, part of every time "
            "below.",
            "",
            "**moto is not S3**: it keeps objects in memory and serves them from one Python "
            "process, on the same 2 cores as the client, the API and the worker. The numbers "
            "say what the service adds on top of a store, not how fast a real bucket is; a "
            "real S3 is further away (latency per request) and much faster per stream. "
            "boto3's `download_file` suffers most: it fetches in parallel ranged GETs (8 MB "
            "each, 10 threads), and moto reads the whole object to answer each range.",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine}",
            f"- Date: {utc_now()}",
            f"- Setup: {setup}",
            *[f"- {d}" for d in details],
            "",
            "Whole job (medians, with the fastest and slowest run in brackets; store calls are "
            "the s3 worker's on the job's keys, timed where they are made). Worker CPU near its "
            "wall time means the worker computed rather than waited: a gap between the stores "
            "there is how fast the same work ran, not time on the store, whose calls have "
            "columns of their own. On a small shared VM that speed varies by several percent "
            "between processes and runs (the round-by-round ratios under the target show it):",
            "",
            job_table(res.runs),
            "",
            "Stage times (medians, seconds, from report.json; on the bucket a stage's "
            "checkpoint push runs once the stage's own clock has stopped, at its `succeeded` "
            "event, so it counts in run_pipeline's time, not in the stage's):",
            "",
            stage_table(res.runs),
            "",
            line,
            "",
            f"Download of a {mb:.0f} MB artifact (medians over the runs, fastest and slowest "
            "in brackets; MB = 10^6 bytes):",
            "",
            download_table(res.downloads, res.blob_bytes, "store, get_object"),
            END,
        ]
    )


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the stacks


def run(profile: str, write: Path | None) -> bool:
    """Entry point for `python -m bench` (see bench/README.md): the defaults in both profiles
    (a store's cost does not depend on a GPU); True when the target is met."""
    argv = [] if write is None else ["--write", str(write)]
    return main(argv, command=command_line()) == 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="whole jobs per store")
    parser.add_argument("--download-repeats", type=int, default=3, help="downloads per way")
    parser.add_argument("--artifact-mb", type=int, default=200, help="the big artifact, MB")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (default 1)")
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "digits.json")
    parser.add_argument("--pg-admin", default=PG_ADMIN)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp folder and logs")
    parser.add_argument("--write", type=Path, help="(re)write the result section in this file")
    args = parser.parse_args(argv)
    if min(args.repeats, args.download_repeats, args.artifact_mb, args.threads) < 1:
        parser.error("--repeats, --download-repeats, --artifact-mb and --threads must be >= 1")
    try:
        args.spec_data = json.loads(args.spec.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"--spec {args.spec}: {e}")
    return args


def measure(args: argparse.Namespace, tmp: Path, details: list[str]) -> Results:
    env = base_env(args.threads)
    with ExitStack() as cleanup:
        store = cleanup.enter_context(moto_store(tmp))
        stacks: dict[str, Stack] = {}
        for name, where in (
            ("local", {"STORAGE_DIR": str(tmp / "local-storage")}),
            ("s3", store.env()),
        ):
            print(f"{name}: starting the stack", flush=True)
            stacks[name] = cleanup.enter_context(
                stack(name, tmp, {**env, **where}, args.pg_admin, args.redis_url)
            )
            details.append(stacks[name].detail)
        stacks["s3"].groups["moto"] = store.pid
        res = Results(measure_jobs(stacks, args.spec_data, args.repeats))
        print(f"download: a {args.artifact_mb} MB artifact", flush=True)
        blob = tmp / BLOB
        res.blob_bytes = args.artifact_mb * 10**6
        sha = make_blob(blob, res.blob_bytes)
        jobs = {name: runs[-1].job_id for name, runs in res.runs.items()}
        place_blob(stacks, jobs, store, blob, sha)
        res.hash_s = hash_seconds(blob)
        ways = download_ways(stacks, jobs, store)
        res.downloads = measure_downloads(ways, sha, tmp, args.download_repeats)
    return res


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """`python -m bench.storage`; `command` is the one shown in the section (default: this
    module with `argv`)."""
    args = parse(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    # This process reports the machine (machine() imports torch): the same threads.
    os.environ.update(OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    load_before = os.getloadavg()[0]  # a shared machine's other work shows in the timings
    tmp = Path(tempfile.mkdtemp(prefix="distillery-bench-storage-"))
    details: list[str] = []
    try:
        res = measure(args, tmp, details)
    finally:
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        spec = args.spec.resolve().relative_to(REPO)
    except ValueError:
        spec = args.spec
    setup = (
        f"spec `{spec}`, {args.repeats} whole jobs per store, {args.download_repeats} downloads "
        f"per way of a {args.artifact_mb} MB artifact, OMP_NUM_THREADS={args.threads} and "
        "OMP_WAIT_POLICY=PASSIVE for every process, service settings at their defaults; "
        f"1-minute load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at "
        f"the end (the benchmark itself keeps about {args.threads} core(s) busy during a job "
        "and both during a download; much more means other work shared the machine)"
    )
    print()
    print(job_table(res.runs))
    print()
    print(stage_table(res.runs))
    print()
    print(download_table(res.downloads, res.blob_bytes, "store, get_object"))
    ok, line = verdict(res.runs)
    print(line.replace("**", ""))
    print(f"setup: {setup}")
    if args.write is not None:
        shown = sys.argv[1:] if argv is None else argv
        command = command or shlex.join(["python", "-m", "bench.storage", *shown])
        write_section(args.write, NAME, section(command, setup, details, res, machine()))
        print(f"wrote {args.write}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
