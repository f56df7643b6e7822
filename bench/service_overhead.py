"""What the service costs a job: submit->running latency, and a whole job's wall time through
the service against `distillery run` in one process, on the same spec.

    python -m bench.service_overhead [--mode embedded|distributed|both] [--repeats R]
        [--latency-jobs N] [--threads T] [--spec examples/digits.json] [--write docs/BENCHMARKS.md]

Each mode gets a stack of real processes, started fresh and torn down at the end:

  embedded      `python -m app.cli serve` in a new DISTILLERY_HOME: the API and one worker,
                SQLite for jobs, kombu's SQLAlchemy transport on SQLite for messages
  distributed   `python -m app.cli api` + one `python -m app.cli worker -Q <queue>` on a fresh
                PostgreSQL database (dropped at the end) and Redis, under a queue of their own

and is measured in two ways, the service already up and its worker ready (what a user of a
running service sees; worker start-up is not counted):

  latency       N tiny jobs, one after the other (each finishes before the next is sent): from
                just before the POST to the job's `started_at`, which the worker sets when it
                claims the job. The API, the DB and this script share one clock.
  whole job     the spec (default examples/digits.json) R times, alternating with
                `python -m app.cli run SPEC --out TMP --fresh --json` in a subprocess: service
                time is POST -> `succeeded` as seen by polling every 0.2 s (and the server's
                `finished_at - created_at`); in-process time is report.json's `wall_seconds`
                (run_pipeline alone) and the whole CLI process (Python and torch imports included).

The target (the service at most 1.1x the in-process job) is judged on the stricter ratio:
service POST -> succeeded as the client observes it, over run_pipeline's own wall time. The ratio
against the whole CLI process is reported too; it credits the service with the ~seconds of
imports its warm worker has already paid, which is not overhead the service removed from
the job.

Both sides get the same environment: OMP_NUM_THREADS=--threads (default 1, as in
bench.distill_speed: spinning OpenMP threads on a small shared VM wreck timings) and
OMP_WAIT_POLICY=PASSIVE (what the CLI sets for itself). Service settings stay at their
defaults (PROGRESS_THROTTLE_SECONDS, HEARTBEAT_SECONDS, ...): those are what is measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
    api_up,
    free_port,
    postgres_database,
    spawn_cli,
    stop_group,
)
from bench.common import machine, markers, utc_now, write_section

REPO = Path(__file__).resolve().parents[1]
NAME = "service_overhead"
START, END = markers(NAME)
TARGET_RATIO = 1.1  # service job wall time at most 1.1x the same job in process
POLL_S = 0.2  # how often the client asks for the job's status
TERMINAL = {"succeeded", "failed", "cancelled"}
MODES = ("embedded", "distributed")


# --- measurements ----------------------------------------------------------------------------


@dataclass
class LocalRun:
    """`distillery run` in a subprocess."""

    process_s: float  # the whole CLI process: interpreter, imports, run_pipeline, exit
    pipeline_s: float  # report.json wall_seconds: run_pipeline alone
    stages: dict[str, float]


@dataclass
class ServiceRun:
    """One job through the service; times from just before the POST (t0)."""

    observed_s: float  # t0 -> the poll that saw `succeeded`
    server_s: float  # finished_at - created_at
    post_s: float  # t0 -> created_at (HTTP, validation, insert)
    queued_s: float  # created_at -> started_at (commit, enqueue, broker, claim)
    pipeline_s: float  # report.json wall_seconds, written by run_pipeline inside the worker
    worker_extra_s: float  # started_at -> finished_at minus run_pipeline: loading, hashing, finish
    stages: dict[str, float]


@dataclass
class ModeResult:
    mode: str
    latencies: list[float] = field(default_factory=list)  # submit -> running, seconds
    posts: list[float] = field(default_factory=list)  # POST round trip, seconds
    local: list[LocalRun] = field(default_factory=list)
    service: list[ServiceRun] = field(default_factory=list)

    def med(self, side: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in getattr(self, side))

    @property
    def ratio(self) -> float:
        """The judged ratio: service observed POST -> succeeded over in-process run_pipeline."""
        return self.med("service", "observed_s") / self.med("local", "pipeline_s")

    @property
    def ratio_process(self) -> float:
        return self.med("service", "observed_s") / self.med("local", "process_s")


def ts(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def stage_seconds(report: dict[str, Any]) -> dict[str, float]:
    return {s["name"]: float(s["seconds"]) for s in report["stages"] if s.get("seconds")}


# --- processes -------------------------------------------------------------------------------


def wait_for(
    what: str, predicate, procs: list[subprocess.Popen], log: Path, timeout: float = 120
) -> None:
    """Wait until predicate() is true; raise with the tail of `log` if a process dies first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            why = (
                f"process {shlex.join(dead[0].args[3:])} exited with {dead[0].returncode}"
                if dead
                else f"timed out after {timeout:.0f} s"
            )
            raise RuntimeError(f"waiting for {what}: {why}; the end of {log}:\n{tail}")
        time.sleep(0.2)


def api_ready(url: str) -> bool:
    return api_up(url)  # /readyz turns 200 only once a worker is up: started next


def worker_ready(log: Path) -> bool:
    return b" ready." in log.read_bytes()


@dataclass
class Stack:
    mode: str
    url: str
    key: str
    storage: Path
    procs: list[subprocess.Popen]
    detail: str  # how it was set up, for the doc


def base_env(threads: int) -> dict[str, str]:
    """This environment without any Distillery setting (so a stray DATABASE_URL cannot leak
    into a stack), plus the thread settings both sides share."""
    from app.core.config import Settings

    fields = {name.upper() for name in Settings.model_fields}  # pydantic-settings ignores case
    env = {k: v for k, v in os.environ.items() if k.upper() not in fields}
    env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    return env


@contextmanager
def embedded_stack(tmp: Path, env: dict[str, str]) -> Iterator[Stack]:
    home, port = tmp / "embedded-home", free_port()
    url, log_path = f"http://127.0.0.1:{port}", tmp / "embedded.log"
    with ExitStack() as cleanup:
        log = cleanup.enter_context(open(log_path, "wb"))
        proc = spawn_cli(["serve", "--port", str(port)], {**env, "DISTILLERY_HOME": str(home)}, log)
        cleanup.callback(stop_group, proc)
        wait_for("the embedded API", lambda: api_ready(url), [proc], log_path)
        wait_for("the embedded worker", lambda: worker_ready(log_path), [proc], log_path)
        key = (home / "api_key").read_text().strip()
        yield Stack(
            "embedded",
            url,
            key,
            home / "storage",
            [proc],
            "`serve`: SQLite jobs DB, kombu SQLAlchemy transport on SQLite",
        )


@contextmanager
def distributed_stack(
    tmp: Path, env: dict[str, str], pg_admin: str, redis_url: str, workers: int = 1
):
    """`api` and `workers` worker processes on a fresh PostgreSQL database and Redis."""
    import redis

    tmp.mkdir(parents=True, exist_ok=True)  # bench.search gives each stack a folder of its own
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **env,
        "BROKER_URL": redis_url,
        "DISTILLERY_HOME": str(tmp / "distributed-home"),
        "STORAGE_DIR": str(tmp / "distributed-storage"),
        "DISTILLERY_API_KEY": "dk_bench_" + uuid.uuid4().hex,
        "DEFAULT_QUEUE": queue,
    }
    try:
        with ExitStack() as cleanup:
            env["DATABASE_URL"] = cleanup.enter_context(
                postgres_database(pg_admin, prefix="distillery_bench")
            )
            api_log = cleanup.enter_context(open(tmp / "api.log", "wb"))
            api = spawn_cli(["api", "--port", str(port)], env, api_log)
            cleanup.callback(stop_group, api)
            wait_for("the API", lambda: api_ready(url), [api], tmp / "api.log")
            procs = [api]
            for i in range(workers):
                path = tmp / f"worker-{i}.log"
                worker = spawn_cli(
                    ["worker", "-Q", queue], env, cleanup.enter_context(open(path, "wb"))
                )
                cleanup.callback(stop_group, worker)
                wait_for("a worker", lambda p=path: worker_ready(p), [worker], path)
                procs.append(worker)
            yield Stack(
                "distributed",
                url,
                env["DISTILLERY_API_KEY"],
                Path(env["STORAGE_DIR"]),
                procs,
                f"`api` + {workers} `worker` process(es): PostgreSQL jobs DB, Redis broker",
            )
    finally:
        r = redis.Redis.from_url(redis_url)
        for k in r.scan_iter(f"*{queue}*"):  # the queue and kombu's bindings of it
            r.delete(k)


# --- one measurement each --------------------------------------------------------------------


def submit(client: httpx.Client, spec: dict[str, Any]) -> tuple[float, float, str]:
    """POST the spec; returns (t0 just before the POST, POST round trip in s, job id)."""
    t0 = time.time()
    r = client.post("/v1/jobs", json=spec)
    rtt = time.time() - t0
    if r.status_code != 201:
        raise RuntimeError(f"POST /v1/jobs: {r.status_code} {r.text[:300]}")
    return t0, rtt, r.json()["id"]


def wait_done(client: httpx.Client, job_id: str, timeout: float) -> tuple[dict[str, Any], float]:
    """Poll every POLL_S until the job is terminal; returns (job, time.time() of that poll)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            seen = time.time()
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
            return job, seen
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
        time.sleep(POLL_S)


def measure_latency(client: httpx.Client, result: ModeResult, n: int) -> None:
    for i in range(n):
        t0, rtt, job_id = submit(client, TINY_SPEC)
        job, _ = wait_done(client, job_id, timeout=600)
        result.latencies.append(ts(job["started_at"]) - t0)
        result.posts.append(rtt)
        print(
            f"  latency {i + 1}/{n}: submit->running {1000 * result.latencies[-1]:7.1f} ms "
            f"(POST {1000 * rtt:.1f} ms)",
            flush=True,
        )


def run_service(client: httpx.Client, stack: Stack, spec: dict[str, Any]) -> ServiceRun:
    t0, _, job_id = submit(client, spec)
    job, seen = wait_done(client, job_id, timeout=3600)
    created, started, finished = (ts(job[k]) for k in ("created_at", "started_at", "finished_at"))
    report = json.loads((stack.storage / "jobs" / job_id / "report.json").read_text())
    pipeline_s = float(report["wall_seconds"])
    return ServiceRun(
        observed_s=seen - t0,
        server_s=finished - created,
        post_s=created - t0,
        queued_s=started - created,
        pipeline_s=pipeline_s,
        worker_extra_s=finished - started - pipeline_s,
        stages=stage_seconds(report),
    )


def run_local(spec_path: Path, out: Path, env: dict[str, str]) -> LocalRun:
    cmd = [sys.executable, "-m", "app.cli", "run", str(spec_path), "--out", str(out), "--fresh"]
    started = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--json"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    process_s = time.perf_counter() - started
    if proc.returncode not in (0, 1):  # 1: a gate failed, the job itself ran
        raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr[-500:]!r}")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return LocalRun(process_s, float(report["wall_seconds"]), stage_seconds(report))


def measure_mode(
    stack: Stack, spec_path: Path, tmp: Path, env: dict[str, str], repeats: int, latency_jobs: int
) -> ModeResult:
    result = ModeResult(stack.mode)
    spec = json.loads(spec_path.read_text())  # the very file the in-process runs read
    headers = {"Authorization": f"Bearer {stack.key}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as client:
        measure_latency(client, result, latency_jobs)
        for r in range(repeats):
            local = run_local(spec_path, tmp / f"local-{stack.mode}-{r}", env)
            result.local.append(local)
            print(
                f"  repeat {r + 1}/{repeats} in process: run_pipeline {local.pipeline_s:6.2f} s, "
                f"CLI process {local.process_s:6.2f} s",
                flush=True,
            )
            svc = run_service(client, stack, spec)
            result.service.append(svc)
            print(
                f"  repeat {r + 1}/{repeats} {stack.mode}: POST->succeeded {svc.observed_s:6.2f} s "
                f"(server {svc.server_s:.2f}, queued {svc.queued_s:.2f}, "
                f"run_pipeline {svc.pipeline_s:.2f}, worker extra {svc.worker_extra_s:.2f})",
                flush=True,
            )
    return result


# --- the report ------------------------------------------------------------------------------


def latency_table(results: list[ModeResult]) -> str:
    lines = [
        "| mode | jobs | submit->running, median (ms) | max (ms) | POST round trip, median (ms) "
        "| first POST (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {len(r.latencies)} | {1000 * statistics.median(r.latencies):.0f} "
            f"| {1000 * max(r.latencies):.0f} | {1000 * statistics.median(r.posts):.0f} "
            f"| {1000 * r.posts[0]:.0f} |"
        )
    return "\n".join(lines)


def job_table(results: list[ModeResult]) -> str:
    lines = [
        "| mode | in process: run_pipeline (s) | in process: CLI process (s) "
        "| service: POST->succeeded, polled (s) | service: finished_at-created_at (s) "
        "| service / run_pipeline | service / CLI process |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r: ModeResult, side: str, attr: str) -> str:
        values = [getattr(run, attr) for run in getattr(r, side)]
        spread = f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
        return f"{statistics.median(values):.2f}{spread}"

    for r in results:
        lines.append(
            f"| {r.mode} | {cell(r, 'local', 'pipeline_s')} | {cell(r, 'local', 'process_s')} "
            f"| {cell(r, 'service', 'observed_s')} | {cell(r, 'service', 'server_s')} "
            f"| **{r.ratio:.3f}x** | {r.ratio_process:.3f}x |"
        )
    return "\n".join(lines)


def breakdown_table(results: list[ModeResult]) -> str:
    """Where the service's time goes, against the in-process run_pipeline of the same mode's runs."""
    lines = [
        "| mode | POST (t0->created_at) | queued (created_at->started_at) | run_pipeline in the worker "
        "| worker before/after run_pipeline | client poll lag | total | total - worker's run_pipeline "
        "| in-process run_pipeline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        post = r.med("service", "post_s")
        queued = r.med("service", "queued_s")
        run_pipeline = r.med("service", "pipeline_s")
        extra = r.med("service", "worker_extra_s")
        lag = statistics.median(s.observed_s - s.post_s - s.server_s for s in r.service)
        around = statistics.median(s.observed_s - s.pipeline_s for s in r.service)
        share = 100 * around / run_pipeline
        lines.append(
            f"| {r.mode} | {post:.2f} | {queued:.2f} | {run_pipeline:.2f} | {extra:.2f} | {lag:.2f} "
            f"| {r.med('service', 'observed_s'):.2f} | {around:.2f} ({share:.1f}%) "
            f"| {r.med('local', 'pipeline_s'):.2f} |"
        )
    return "\n".join(lines)


def stage_table(results: list[ModeResult]) -> str:
    names: list[str] = []
    for r in results:
        for run in [*r.local, *r.service]:
            names += [n for n in run.stages if n not in names]
    local = [run for r in results for run in r.local]
    head = "| stage | in process (s) | " + " | ".join(f"{r.mode} (s)" for r in results) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(results)]

    def med(runs: list, name: str) -> str:
        values = [run.stages[name] for run in runs if name in run.stages]
        return f"{statistics.median(values):.2f}" if values else "-"

    for name in names:
        cells = [med(r.service, name) for r in results]
        lines.append(f"| {name} | {med(local, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(results: list[ModeResult]) -> tuple[bool, str]:
    ok = all(r.ratio <= TARGET_RATIO for r in results)
    measured = ", ".join(f"{r.mode} {r.ratio:.3f}x" for r in results)
    return ok, (
        f"Target: service POST->succeeded / in-process run_pipeline <= {TARGET_RATIO}x in every mode. "
        f"Measured: {measured} -> **{'PASS' if ok else 'FAIL'}**"
    )


def section(
    command: str, setup: str, stacks: list[str], results: list[ModeResult], machine: str
) -> str:
    _, line = verdict(results)
    return "\n".join(
        [
            START,
            "## Service overhead: submit->running, and a whole job through the service",
            "",
            "What running a job through the service costs over `distillery run` in one "
            "process, on the same spec and machine, with the service already up and its "
            "worker ready. **Latency**: tiny jobs sent one after the other; time from just "
            "before the POST to the job's `started_at` (set when the worker claims it; the API, "
            "the DB and the client share one clock, and a worker may claim the job before the "
            "POST's response is back). **Whole job**: the spec through the "
            "service, POST until a poll every 0.2 s sees `succeeded` (the server's own "
            "`finished_at - created_at` beside it), alternating with `python -m app.cli run "
            "SPEC --out TMP --fresh --json` in a subprocess; medians over the repeats.",
            "",
            "Which ratio is judged: the service's POST->succeeded as the client observes it, "
            "over report.json's `wall_seconds` of the in-process run (run_pipeline alone). That is "
            "the stricter one: everything the service adds to a job shows up in it. The ratio "
            "over the whole CLI process (interpreter start, torch and pipeline imports, exit) "
            "is shown too; it is what a user who types `distillery run` waits for, but it "
            "credits the service with imports its warm worker paid once at start-up. Even "
            "the judged ratio leans a little the service's way: a fresh process also pays "
            "one-off lazy imports inside its first run_pipeline (torch._dynamo among them, about "
            "a second here) that the warm worker paid on the latency jobs. The "
            "`total - worker's run_pipeline` column below has no such lean: it is the service's "
            "own cost around the same pipeline call, in the same process.",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine}",
            f"- Date: {utc_now()}",
            f"- Setup: {setup}",
            *[f"- {s}" for s in stacks],
            "",
            "Submit->running latency:",
            "",
            latency_table(results),
            "",
            "Whole job (medians, with the fastest and slowest run in brackets):",
            "",
            job_table(results),
            "",
            "Where the service's time goes (medians, seconds; the columns before `total` add "
            "up to it only roughly, each being a median):",
            "",
            breakdown_table(results),
            "",
            "Stage times (medians, seconds, from report.json):",
            "",
            stage_table(results),
            "",
            line,
            END,
        ]
    )


def _exit_on_signal(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the stacks


def run(profile: str, write: Path | None) -> bool:
    """Entry point for `python -m bench` (see bench/README.md): the defaults below in both
    profiles (what the service adds does not depend on a GPU); True when the target is met."""
    from bench.common import command_line

    argv = [] if write is None else ["--write", str(write)]
    return main(argv, command=command_line()) == 0


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """`python -m bench.service_overhead`; `command` is the one shown in the section (default:
    this module with `argv`)."""
    parser = argparse.ArgumentParser(prog="python -m bench.service_overhead", description=__doc__)
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3, help="whole-job runs per side and mode")
    parser.add_argument("--latency-jobs", type=int, default=10, help="tiny jobs for the latency")
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS for both sides (default 1)"
    )
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "digits.json")
    parser.add_argument("--pg-admin", default=PG_ADMIN)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp folder and logs")
    parser.add_argument("--write", type=Path, help="(re)write the result section in this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.latency_jobs < 1 or args.threads < 1:
        parser.error("--repeats, --latency-jobs and --threads must be at least 1")
    spec_path = args.spec.resolve()
    try:
        json.loads(spec_path.read_text())
    except (OSError, ValueError) as e:
        parser.error(f"--spec {args.spec}: {e}")
    modes = list(MODES) if args.mode == "both" else [args.mode]

    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    env = base_env(args.threads)
    # This process reports the machine (machine() imports torch): the same threads.
    os.environ.update(OMP_NUM_THREADS=env["OMP_NUM_THREADS"], OMP_WAIT_POLICY="PASSIVE")

    load_before = os.getloadavg()[0]  # a shared machine's other work shows in the timings
    tmp = Path(tempfile.mkdtemp(prefix="distillery-bench-"))
    results: list[ModeResult] = []
    stacks: list[str] = []
    try:
        # Untimed: warms the file cache for the first timed in-process run.
        (tmp / "tiny.json").write_text(json.dumps(TINY_SPEC))
        run_local(tmp / "tiny.json", tmp / "warm", env)
        for mode in modes:
            print(f"{mode}: starting the stack", flush=True)
            cm = (
                embedded_stack(tmp, env)
                if mode == "embedded"
                else distributed_stack(tmp, env, args.pg_admin, args.redis_url)
            )
            with cm as stack:
                stacks.append(f"{mode}: {stack.detail}")
                results.append(
                    measure_mode(stack, spec_path, tmp, env, args.repeats, args.latency_jobs)
                )
    finally:
        if args.keep_logs:
            print(f"logs and artifacts kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    try:
        shown_spec = spec_path.relative_to(REPO)
    except ValueError:
        shown_spec = spec_path
    setup = (
        f"spec `{shown_spec}`, {args.repeats} whole-job repeats per mode (in process and "
        f"service alternating), {args.latency_jobs} tiny latency jobs per mode "
        f"(`app.testing.TINY_SPEC`), OMP_NUM_THREADS={args.threads} and "
        "OMP_WAIT_POLICY=PASSIVE for every process, service settings at their defaults "
        "(PROGRESS_THROTTLE_SECONDS=1, HEARTBEAT_SECONDS=5), client polls every 0.2 s; "
        f"1-minute load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at "
        f"the end (the benchmark itself keeps about {args.threads} core(s) busy; much more "
        "means other work shared the machine)"
    )
    print()
    print(latency_table(results))
    print()
    print(job_table(results))
    print()
    print(breakdown_table(results))
    print()
    print(stage_table(results))
    ok, line = verdict(results)
    print(line.replace("**", ""))
    if args.write is not None:
        argv_shown = sys.argv[1:] if argv is None else argv
        command = command or shlex.join(["python", "-m", "bench.service_overhead", *argv_shown])
        write_section(args.write, NAME, section(command, setup, stacks, results, machine()))
        print(f"wrote {args.write}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
