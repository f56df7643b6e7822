"""The service's commands: serve, api, worker, migrate, keys, gc, and run (a whole job in this
process). The thin `distillery` command (distillery/cli.py) loads this module only when one of
them is called and this install has its extra; everything heavy is imported inside them."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from distillery.cli_support import (
    EXIT_GATE_FAILED,
    EXIT_INPUT,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    read_text,
)
from distillery.output import (
    candidate_table,
    emit_json,
    final_summary,
    fmt_bytes,
    metrics_table,
    print_gates,
    progress_bar,
)
from distillery_contract.states import StageStatus


def load_spec(path: str):
    """Read and validate a spec file; exits 2 with one line per bad field."""
    from pydantic import ValidationError

    from worker.pipeline.spec import JobSpec, format_validation_error

    text = read_text(path, "spec")
    try:
        return JobSpec.model_validate_json(text)
    except ValidationError as e:
        click.echo(f"error [invalid_spec]: {format_validation_error(e)}", err=True)
        sys.exit(EXIT_JOB_FAILED)


@click.command()
@click.argument("spec_path", metavar="SPEC")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="folder for artifacts and report.json",
)
@click.option("--fresh", is_flag=True, help="ignore checkpoints in OUT from an earlier run")
@click.option("--json", "as_json", is_flag=True, help="print report.json instead of tables")
@click.option("--debug", is_flag=True, help="on a crash, show the Python traceback")
def run(spec_path: str, out_dir: str, fresh: bool, as_json: bool, debug: bool) -> None:
    """Run a whole job in this process, without the service.

    Exit codes: 0 done and all gates passed, 1 a gate failed, 2 the job failed (or the spec
    was refused), 5 the spec could not be read.
    """
    from rich.console import Console

    from worker.pipeline.errors import PipelineError
    from worker.pipeline.runner import run_pipeline

    spec = load_spec(spec_path)
    console = Console(stderr=True)
    progress = progress_bar(console, disable=as_json)
    on_event = _run_display(progress, as_json)

    try:
        with progress:
            report = run_pipeline(
                spec,
                Path(out_dir),
                on_event=on_event,
                resume=not fresh,
                limits=_settings().spec_limits(),  # MAX_SPEC_* from the environment
                data_settings=_settings().data_settings(),  # DATA_* likewise
            )
    except PipelineError as e:
        # Plain, unwrapped, one line: scripts grep for the code.
        click.echo(f"error [{e.code}]: {e.message}", err=True)
        sys.exit(EXIT_JOB_FAILED)
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to resume")
        sys.exit(130)
    except Exception as e:  # a bug: one line, like any failure; --debug shows where
        if debug:
            raise
        click.echo(
            f"error [internal_error]: {type(e).__name__}: {e} (--debug shows the traceback)",
            err=True,
        )
        sys.exit(EXIT_JOB_FAILED)

    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        console.print(metrics_table(report["metrics"]))
        if "candidates" in report:
            s = report["search"]
            title = (
                f"{s['measured']} candidates, objective {s['objective']}: * on the Pareto "
                "front, >> the final model"
            )
            console.print(candidate_table(report["candidates"], title=title))
        console.print(final_summary(report["metrics"]["final"]))
        print_gates(report["gates"], echo=lambda line: click.echo(line, err=True))
        console.print(f"artifacts and report.json in {out_dir} ({report['wall_seconds']:.1f}s)")
    sys.exit(EXIT_OK if report["gates_passed"] else EXIT_GATE_FAILED)


def _run_display(progress, as_json: bool):
    """The pipeline's events as `distillery run` shows them: the bar, then one line per
    finished stage and per measured model."""
    task = progress.add_task("job", total=1.0, stage="data", message="")

    def on_event(e: dict[str, Any]) -> None:
        if e["type"] == "progress":
            progress.update(
                task, completed=e["progress"], stage=e["stage"], message=e["message"][:60]
            )
        elif e["type"] == "stage" and e["status"] == StageStatus.SUCCEEDED and not as_json:
            how = "resumed from checkpoint" if e.get("resumed") else f"{e.get('seconds', 0):.1f}s"
            progress.console.print(f"[green]✓[/] {e['stage']} ({how})")
        elif e["type"] == "metrics" and not as_json:
            m = e["metrics"]
            progress.console.print(
                f"  {e['model']}: accuracy {m['accuracy']:.4f}, {m['params']:,} params, "
                f"{fmt_bytes(m['size_bytes'])}, {m['latency_ms']:.3f} ms"
            )

    return on_event


def _settings():
    from app.core.config import Settings

    return Settings()


@click.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic)."""
    from app.core.migrate import upgrade

    s = _settings()
    s.home.mkdir(parents=True, exist_ok=True)
    upgrade(s.database_url)
    click.echo(f"database at head: {_redact(s.database_url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@click.group()
def keys() -> None:
    """Manage API keys."""


def _service_database(s) -> str:
    """The URL of the service's existing database, or a refusal naming where it looked: a key
    made in a database nobody serves (keys create run in another folder made a new
    ./.distillery) would be refused by the running service."""
    from sqlalchemy import create_engine, inspect

    if s.DATABASE_URL is None and not (s.home / "distillery.db").is_file():
        raise click.ClickException(
            f"no Distillery database in {s.home} (DISTILLERY_HOME, by default ./.distillery "
            "in the current folder): run this in the folder where `distillery serve` runs, "
            "or set DISTILLERY_HOME (or DATABASE_URL) to the service's"
        )
    engine = create_engine(s.database_url)
    try:
        ready = inspect(engine).has_table("tenants")
    except Exception as e:  # unreachable, refused: say so in one line
        raise click.ClickException(f"cannot open {_redact(s.database_url)}: {e}") from None
    finally:
        engine.dispose()
    if not ready:
        raise click.ClickException(
            f"{_redact(s.database_url)} has no Distillery tables: run `distillery migrate` "
            "first, or set DATABASE_URL to the service's database"
        )
    return s.database_url


@keys.command("create")
@click.option("--tenant", required=True, help="tenant name (created if new)")
def keys_create(tenant: str) -> None:
    """Create an API key for TENANT in the service's database (DISTILLERY_HOME's, or
    DATABASE_URL) and print it (it is stored hashed: save it now)."""
    from app.core.db import Database
    from app.core.migrate import upgrade
    from app.services import tenants

    url = _service_database(_settings())
    upgrade(url)  # an older schema of the same service: what serve does at start
    with Database(url).session() as session:
        key = tenants.create_key(session, tenant_name=tenant)
    click.echo(f"key of tenant {tenant!r} in {_redact(url)}", err=True)
    click.echo(key)


@keys.command("revoke")
@click.argument("key")
def keys_revoke(key: str) -> None:
    """Revoke KEY; requests with it get 401 from now on."""
    from app.core.db import Database
    from app.services import tenants

    with Database(_service_database(_settings())).session() as session:
        if not tenants.revoke_key(session, key=key):
            raise click.ClickException("no such active key")
    click.echo("revoked")


@click.command()
@click.option("--dry-run", is_flag=True, help="list what would go; delete nothing")
@click.option(
    "--artifact-ttl-days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="instead of ARTIFACT_TTL_DAYS: delete the files of jobs that ended this long ago",
)
@click.option(
    "--upload-ttl-days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="instead of UPLOAD_TTL_DAYS: delete uploads no job used for this long",
)
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def gc(
    dry_run: bool, artifact_ttl_days: float | None, upload_ttl_days: float | None, as_json: bool
) -> None:
    """Apply retention now: delete the files of jobs that ended ARTIFACT_TTL_DAYS ago (their
    records stay) and uploads no job used for UPLOAD_TTL_DAYS, as the reaper does every
    RETENTION_INTERVAL_SECONDS. Lists each (id, tenant, age, bytes).

    Exit codes: 0 done, 4 the store failed for some (listed on stderr; the next run retries
    them), 5 neither TTL set."""
    from app.core.db import Database
    from app.core.storage import open_storage
    from app.services import retention

    s = _settings()
    artifact_ttl = artifact_ttl_days or s.ARTIFACT_TTL_DAYS
    upload_ttl = upload_ttl_days or s.UPLOAD_TTL_DAYS
    if artifact_ttl is None and upload_ttl is None:
        click.echo(
            "error [retention_off]: set ARTIFACT_TTL_DAYS and/or UPLOAD_TTL_DAYS, or pass "
            "--artifact-ttl-days / --upload-ttl-days",
            err=True,
        )
        sys.exit(EXIT_INPUT)
    db = Database(s.database_url)
    try:
        done = retention.sweep(
            db,
            open_storage(s),
            artifact_ttl_days=artifact_ttl,
            upload_ttl_days=upload_ttl,
            dry_run=dry_run,
        )
    finally:
        db.dispose()
    _print_gc(done, dry_run=dry_run, as_json=as_json)
    for kept in done.kept:
        click.echo(f"kept {kept.id}: {kept.reason}", err=True)
    sys.exit(EXIT_UNREACHABLE if any(k.store_failed for k in done.kept) else EXIT_OK)


def _print_gc(done, *, dry_run: bool, as_json: bool) -> None:
    """One line per job and upload, then the total; or all of it as JSON."""
    from dataclasses import asdict

    from app.models import utcnow

    now = utcnow()

    def age(then) -> float:  # in days
        return round((now - then).total_seconds() / 86400, 1)

    if as_json:
        jobs = [{**asdict(j), "age_days": age(j.finished_at)} for j in done.jobs]
        uploads = [{**asdict(u), "age_days": age(u.created_at)} for u in done.uploads]
        emit_json({"dry_run": dry_run, "jobs": jobs, "uploads": uploads, "bytes": done.bytes})
        return
    for j in done.jobs:
        click.echo(
            f"job      {j.id}  tenant {j.tenant}  ended {age(j.finished_at)} days ago  "
            f"{j.files} files  {fmt_bytes(j.bytes)}"
        )
    for u in done.uploads:
        click.echo(
            f"{u.kind:<8} {u.id}  tenant {u.tenant}  uploaded {age(u.created_at)} days ago  "
            f"{fmt_bytes(u.bytes)}"
        )
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb}: the files of {len(done.jobs)} job(s), {len(done.uploads)} upload(s); "
        f"{fmt_bytes(done.bytes)}{' (dry run: nothing was deleted)' if dry_run else ''}"
    )


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="API processes")
def api(host: str, port: int, workers: int) -> None:
    """Run the API alone (distributed mode: workers run separately)."""
    run_uvicorn(host, port, workers)


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose accepted connections get TCP_NODELAY.

    uvicorn binds its own socket for `--workers N` with protocol 0, and asyncio sets
    TCP_NODELAY only on sockets whose protocol is IPPROTO_TCP, so every response then waits
    on Nagle + delayed ACK (~40 ms on Linux; uvicorn#3149). Declaring the protocol, and
    setting the option on the listener (Linux copies it to accepted sockets), avoids that.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def run_uvicorn(
    host: str, port: int, workers: int = 1, on_exit: Callable[[], None] | None = None
) -> None:
    """uvicorn.run, except that with several processes the socket is ours (see listen_socket).
    `on_exit` (one process only) is called as soon as a signal asks the server to stop, before
    its graceful shutdown, which takes a while."""
    import uvicorn

    config = uvicorn.Config(
        "app.main:create_app", factory=True, host=host, port=port, workers=workers, log_level="info"
    )
    if workers <= 1:

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if on_exit is not None:
                    on_exit()
                super().handle_exit(sig, frame)

        Server(config).run()  # binds through asyncio, which sets TCP_NODELAY itself
        return
    from uvicorn.supervisors import Multiprocess

    sock = listen_socket(host, port)
    click.echo(
        f"Distillery API on http://{host}:{sock.getsockname()[1]} ({workers} processes)", err=True
    )
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()


@click.command()
@click.option(
    "-Q",
    "--queues",
    default=None,
    help="comma-separated queues to consume (default: DEFAULT_QUEUE)",
)
@click.option(
    "--pool",
    type=click.Choice(["solo", "threads"]),
    default=None,
    help="solo (default): one job at a time in this process; threads: for WEBHOOK_QUEUE "
    "(the default when it is the only queue)",
)
@click.option("--concurrency", type=int, default=8, show_default=True, help="threads pool size")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str | None, pool: str | None, concurrency: int, loglevel: str) -> None:
    """Run a worker: one job at a time in this process (start as many as the host takes), or,
    with -Q webhooks, the webhook deliveries, many at once on threads."""
    from app.core.migrate import upgrade

    s = _settings()
    s.home.mkdir(parents=True, exist_ok=True)
    upgrade(s.database_url)
    from worker.celery_app import WEBHOOK_TASKS, make_celery

    queues = queues or s.DEFAULT_QUEUE
    # A job runs in the worker's own process (SIGKILL takes it down too); deliveries are
    # short HTTP calls that wait on the network, many at a time.
    webhooks_only = set(queues.split(",")) == {s.WEBHOOK_QUEUE}
    pool = pool or ("threads" if webhooks_only else "solo")
    # The webhook worker loads the delivery task alone: a job message that reached its
    # queue is refused as unknown, never run on its threads beside every tenant's deliveries.
    tasks = WEBHOOK_TASKS if webhooks_only else None
    make_celery(s, include=tasks).worker_main(
        [
            "worker",
            "-Q",
            queues,
            "--pool",
            pool,
            *(["--concurrency", str(concurrency)] if pool == "threads" else []),
            "--loglevel",
            loglevel,
            "-n",
            f"worker-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _embedded_key(s) -> str:
    """The key `serve` prints: DISTILLERY_API_KEY if set, else one kept in DISTILLERY_HOME."""
    from app.core.db import Database
    from app.services import tenants

    if s.DISTILLERY_API_KEY:
        return s.DISTILLERY_API_KEY
    path = s.home / "api_key"
    db = Database(s.database_url)
    try:
        with db.session() as session:
            if path.exists():
                key = path.read_text().strip()
                if tenants.authenticate(session, key=key) is not None:
                    return key
            key = tenants.create_key(session, tenant_name="default")
    finally:
        db.dispose()
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # the shell's status for a process ended by this signal


def _hangup_as_sigterm(signum: int, frame: Any) -> None:
    # A closed terminal stops serve as SIGTERM does: exiting from within uvicorn's event loop
    # would cut short its shutdown (the app's lifespan end).
    signal.raise_signal(signal.SIGTERM)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("-Q", "--queues", default=None, help="queues the embedded worker consumes")
def serve(host: str, port: int, queues: str | None) -> None:
    """Run the API and one worker together, with no other service (SQLite, SQLite broker,
    artifacts under DISTILLERY_HOME). The worker is supervised: restarted if it dies, its job
    resumed from its last checkpoint."""
    from app.core.migrate import upgrade
    from app.supervisor import WorkerSupervisor, serve_log
    from app.webhooks.outbox import SEND_WEBHOOK
    from worker.celery_app import make_celery, make_enqueue, make_send_webhook

    s = _settings()
    s.home.mkdir(parents=True, exist_ok=True)
    upgrade(s.database_url)
    key = _embedded_key(s)
    env = {**os.environ, "DISTILLERY_HOME": str(s.home)}
    worker_cmd = [sys.executable, "-m", "distillery", "worker"]
    celery = make_celery(s)
    info = {SEND_WEBHOOK: make_send_webhook(celery)}  # a job it fails tells its webhooks
    supervisors = [
        WorkerSupervisor(
            worker_cmd + (["-Q", queues] if queues else []),
            env,
            s,
            make_enqueue(celery),
            serve_log,
            db_info=info,
        ),
        # Deliveries have a worker of their own: the job worker runs one job at a time.
        WorkerSupervisor(
            worker_cmd + ["-Q", s.WEBHOOK_QUEUE], env, s, make_enqueue(celery), serve_log
        ),
    ]
    # Unhandled, SIGTERM (systemd, docker stop) would end serve at once, skipping the
    # `finally` that stops the workers. uvicorn handles SIGTERM while it runs, then restores
    # this handler and raises the signal again once it has shut down: serve exits 143 here.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _hangup_as_sigterm)
    try:
        for supervisor in supervisors:
            supervisor.start()
        click.echo(f"Distillery on http://{host}:{port}  (home: {s.home})", err=True)
        click.echo(f"API key: {key}", err=True)
        click.echo(
            f"  curl -H 'Authorization: Bearer {key}' http://{host}:{port}/v1/jobs", err=True
        )
        # Marked at the signal, not after uvicorn's shutdown: a signal to the whole process
        # group stops the workers meanwhile, and they must not be restarted.
        run_uvicorn(host, port, on_exit=lambda: [sv.stopping() for sv in supervisors])
    finally:
        for supervisor in supervisors:
            supervisor.stop()
