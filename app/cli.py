"""The `distillery` command."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import click

# Exit codes, the same for every command (documented in docs/cli.md). 1 means "a gate failed"
# and nothing else, so CI can tell a model that missed its budget from a broken invocation.
EXIT_OK, EXIT_GATE_FAILED, EXIT_JOB_FAILED, EXIT_TIMEOUT, EXIT_UNREACHABLE, EXIT_INPUT = (
    0,
    1,
    2,
    3,
    4,
    5,
)


class InputError(click.ClickException):
    """Input the command could not use: an unreadable file, bad JSON, an unknown artifact."""

    exit_code = EXIT_INPUT


class _Commands(click.Group):
    """Click exits 2 on a usage error and 1 on its own errors; here both are bad input (5):
    2 means a job failed and 1 a gate failed."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.ClickException as e:
            e.show()
            sys.exit(EXIT_INPUT if isinstance(e, click.UsageError) else e.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Distillery: distill, prune, quantize and measure PyTorch models."""
    # OpenMP threads that spin while waiting stall badly when a vCPU is descheduled or another
    # process shares the cores (seen here: 10x slower epochs). Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


def read_text(path: str, what: str) -> str:
    """A file's text, or stdin's for `-`; an unreadable one is bad input (exit 5)."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}"
        ) from None


def read_json(path: str, what: str) -> Any:
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None


def print_gates(results: list[dict[str, Any]], echo=click.echo) -> None:
    """One line per gate with its measured value: `gate final.size_ratio>=20: 222.9 pass`."""
    for r in results:
        value = "not measured" if r["value"] is None else f"{r['value']:.6g}"
        echo(f"gate {r['gate']}: {value} {'pass' if r['passed'] else 'FAIL'}")


def progress_bar(console, *, disable: bool):
    """The one progress display: stage, bar, percent, elapsed, and a message (`message`)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.fields[stage]:<9}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"),
        console=console,
        disable=disable,
    )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def metrics_table(metrics: dict[str, dict[str, Any]]):
    from rich.table import Table

    table = Table(title="metrics (ONNX Runtime, CPU, batch 1)")
    for col in ("model", "accuracy", "params", "size", "latency ms"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for key in ("teacher", "baseline", "student", "pruned", "quantized"):
        if key in metrics:
            m = metrics[key]
            table.add_row(
                key,
                f"{m['accuracy']:.4f}",
                f"{m['params']:,}",
                _fmt_bytes(m["size_bytes"]),
                f"{m['latency_ms']:.3f}",
            )
    return table


def final_summary(final: dict[str, Any]) -> str:
    parts = [
        f"final = {final['model']}",
        f"accuracy drop {final['accuracy_drop'] * 100:+.2f} pt",
        f"{final['size_ratio']:.1f}x smaller",
        f"{final['speedup']:.1f}x faster",
    ]
    if "distill_gain" in final:
        parts.append(f"distillation vs no teacher {final['distill_gain'] * 100:+.2f} pt")
    if final.get("student_kept") == "baseline":
        parts.append("kept the student trained without a teacher (it scored higher on validation)")
    return ", ".join(parts)


@main.command()
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
        elif e["type"] == "stage" and e["status"] == "succeeded" and not as_json:
            how = "resumed from checkpoint" if e.get("resumed") else f"{e.get('seconds', 0):.1f}s"
            progress.console.print(f"[green]✓[/] {e['stage']} ({how})")
        elif e["type"] == "metrics" and not as_json:
            m = e["metrics"]
            progress.console.print(
                f"  {e['model']}: accuracy {m['accuracy']:.4f}, {m['params']:,} params, "
                f"{_fmt_bytes(m['size_bytes'])}, {m['latency_ms']:.3f} ms"
            )

    return on_event


# --- the service -------------------------------------------------------------------------


def _settings():
    from app.core.config import Settings

    return Settings()


@main.command()
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


@main.group()
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="tenant name (created if new)")
def keys_create(tenant: str) -> None:
    """Create an API key for TENANT and print it (it is stored hashed: save it now)."""
    from app.core.db import Database
    from app.core.migrate import upgrade
    from app.services import tenants

    s = _settings()
    s.home.mkdir(parents=True, exist_ok=True)
    upgrade(s.database_url)
    with Database(s.database_url).session() as session:
        key = tenants.create_key(session, tenant_name=tenant)
    click.echo(key)


@keys.command("revoke")
@click.argument("key")
def keys_revoke(key: str) -> None:
    """Revoke KEY; requests with it get 401 from now on."""
    from app.core.db import Database
    from app.services import tenants

    with Database(_settings().database_url).session() as session:
        if not tenants.revoke_key(session, key=key):
            raise click.ClickException("no such active key")
    click.echo("revoked")


@main.command()
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


def run_uvicorn(host: str, port: int, workers: int = 1) -> None:
    """uvicorn.run, except that with several processes the socket is ours (see listen_socket)."""
    import uvicorn

    config = uvicorn.Config(
        "app.main:create_app", factory=True, host=host, port=port, workers=workers, log_level="info"
    )
    if workers <= 1:
        uvicorn.Server(config).run()  # binds through asyncio, which sets TCP_NODELAY itself
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


@main.command()
@click.option(
    "-Q",
    "--queues",
    default=None,
    help="comma-separated queues to consume (default: DEFAULT_QUEUE)",
)
@click.option("--loglevel", default="INFO", show_default=True)
def worker(queues: str | None, loglevel: str) -> None:
    """Run a worker: one job at a time in this process (start as many as the host takes)."""
    import os

    from app.core.migrate import upgrade

    s = _settings()
    s.home.mkdir(parents=True, exist_ok=True)
    upgrade(s.database_url)
    from worker.celery_app import make_celery

    make_celery(s).worker_main(
        [
            "worker",
            "-Q",
            queues or s.DEFAULT_QUEUE,
            "--pool",
            "solo",  # the job runs in this process: SIGKILL takes it down too
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


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("-Q", "--queues", default=None, help="queues the embedded worker consumes")
def serve(host: str, port: int, queues: str | None) -> None:
    """Run the API and one worker together, with no other service (SQLite, SQLite broker,
    artifacts under DISTILLERY_HOME). The worker is supervised: restarted if it dies, its job
    resumed from its last checkpoint."""
    from app.core.migrate import upgrade
    from app.supervisor import WorkerSupervisor, serve_log
    from worker.celery_app import make_celery, make_enqueue

    s = _settings()
    s.home.mkdir(parents=True, exist_ok=True)
    upgrade(s.database_url)
    key = _embedded_key(s)
    env = {**os.environ, "DISTILLERY_HOME": str(s.home)}
    cmd = [sys.executable, "-m", "app.cli", "worker"] + (["-Q", queues] if queues else [])

    supervisor = WorkerSupervisor(cmd, env, s, make_enqueue(make_celery(s)), serve_log)
    supervisor.start()
    click.echo(f"Distillery on http://{host}:{port}  (home: {s.home})", err=True)
    click.echo(f"API key: {key}", err=True)
    click.echo(f"  curl -H 'Authorization: Bearer {key}' http://{host}:{port}/v1/jobs", err=True)
    try:
        run_uvicorn(host, port)
    finally:
        supervisor.stop()


# --- the client commands -------------------------------------------------------------------


def _client():
    from app.client import Client

    return Client()


def _guard(fn):
    """Map client failures to one stderr line and an exit code (never a traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import httpx

        from app.client import ApiError, DownloadError

        try:
            return fn(*args, **kwargs)
        except ApiError as e:
            click.echo(f"error [{e.code}]: {e.message}", err=True)
            sys.exit(_api_error_exit(e.status))
        except DownloadError as e:
            click.echo(f"error [download_failed]: {e}", err=True)
            sys.exit(EXIT_JOB_FAILED)
        except httpx.TransportError as e:
            from app.client import DEFAULT_URL

            url = os.environ.get("DISTILLERY_URL", DEFAULT_URL)
            click.echo(f"error [unreachable]: cannot reach {url}: {e}", err=True)
            sys.exit(EXIT_UNREACHABLE)

    return wrapper


def _api_error_exit(status: int) -> int:
    if status in (401, 403) or status >= 500:
        return EXIT_UNREACHABLE  # the service, or the key, is the problem
    if status == 404:
        return EXIT_INPUT  # a job, artifact or upload id that does not exist
    return EXIT_JOB_FAILED  # refused: an invalid spec (422), a conflict (409)


def _gates_option(fn):
    def parse(_ctx, _param, values):
        from worker.pipeline.gates import parse_gate

        try:  # a typo'd metric is refused here, before a job is submitted (exit 5)
            return [parse_gate(v) for v in values]
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return click.option(
        "--gate",
        "gates",
        multiple=True,
        callback=parse,
        metavar="EXPR",
        help="MODEL.METRIC OP NUMBER over the metrics contract, e.g. 'final.accuracy_drop<=0.01' (repeatable)",
    )(fn)


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _job_table(job) -> None:
    from rich.console import Console

    console = Console()
    # Plain lines for the id and the error: scripts grep them, and rich would wrap them.
    stage = f" ({job.stage})" if job.stage and job.status != "succeeded" else ""
    click.echo(f"{job.id} {job.name}: {job.status}{stage}")
    if job.error:
        click.echo(f"error [{job.error.code}]: {job.error.message}")
    if any(k in job.metrics for k in ("teacher", "student")):
        console.print(metrics_table(job.metrics))
    if "final" in job.metrics:
        console.print(final_summary(job.metrics["final"]))


def verdict(job, gates) -> list[dict[str, Any]]:
    """The spec's gates (checked by the job) and the `--gate` flags as one list: the job's
    verdict, each with its measured value. Empty unless the job succeeded."""
    from worker.pipeline.gates import check

    if job.status != "succeeded":
        return []
    results = [g.model_dump(exclude_none=True) for g in job.gates]
    seen = {r["gate"] for r in results}
    results += [check(g, job.metrics).as_dict() for g in gates if g.expr not in seen]
    return results


def _finish(job, gates, as_json: bool) -> None:
    """Print the outcome and every gate of a finished job, then exit with the documented code."""
    results = verdict(job, gates)
    if as_json:
        _emit_json(
            {
                "job": job.model_dump(mode="json"),
                "gates": results,
                "gates_passed": all(r["passed"] for r in results),
            }
        )
    else:
        _job_table(job)
        print_gates(results)
    if job.status != "succeeded":
        sys.exit(EXIT_JOB_FAILED)
    sys.exit(EXIT_OK if all(r["passed"] for r in results) else EXIT_GATE_FAILED)


def _wait(client, job_id: str, timeout: float | None, as_json: bool):
    from rich.console import Console

    from app.client import WaitTimeout

    progress = progress_bar(Console(stderr=True), disable=as_json)
    task = progress.add_task(job_id, total=1.0, stage="queued", message="")

    def update(job) -> None:
        progress.update(
            task, completed=job.progress, stage=job.stage or job.status, message=job.status
        )

    try:
        with progress:
            return client.wait(job_id, timeout=timeout, poll=1.0, on_update=update)
    except WaitTimeout as e:
        if as_json:
            _emit_json({"job": e.job.model_dump(mode="json"), "gates": [], "timeout": True})
        click.echo(f"timeout: {e}", err=True)
        sys.exit(EXIT_TIMEOUT)


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option(
    "--wait", "wait_", is_flag=True, help="follow the job to its end (progress bar, then metrics)"
)
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="with --wait: give up after this many seconds (exit 3)",
)
@click.option(
    "--idempotency-key", default=None, help="resubmitting with the same key returns the same job"
)
@_gates_option
@click.option("--json", "as_json", is_flag=True)
@_guard
def submit(
    spec_path: str,
    wait_: bool,
    timeout: float | None,
    idempotency_key: str | None,
    gates,
    as_json: bool,
) -> None:
    """Submit SPEC (a JSON file, or - for stdin) to the service.

    With --wait, the spec's own gates and every --gate make one verdict. Exit codes: 0 done
    and every gate passed (or submitted, without --wait); 1 a gate failed; 2 the job failed,
    was cancelled or was refused; 3 --timeout passed; 4 the service could not be reached or
    refused the key; 5 bad input (an unreadable or invalid JSON file, a bad flag).
    """
    spec = read_json(spec_path, "spec")
    with _client() as client:
        job = client.submit(spec, idempotency_key=idempotency_key)
        if not wait_:
            _emit_json(job.model_dump(mode="json")) if as_json else click.echo(job.id)
            if gates:
                click.echo("note: --gate is checked only with --wait", err=True)
            return
        click.echo(f"submitted {job.id}", err=True)
        _finish(_wait(client, job.id, timeout, as_json), gates, as_json)


@main.command("wait")
@click.argument("job_id")
@click.option(
    "--timeout", type=float, default=None, help="give up after this many seconds (exit 3)"
)
@_gates_option
@click.option("--json", "as_json", is_flag=True)
@_guard
def wait_cmd(job_id: str, timeout: float | None, gates, as_json: bool) -> None:
    """Wait for JOB_ID to end; check gates. Exit codes as for `submit --wait`."""
    with _client() as client:
        _finish(_wait(client, job_id, timeout, as_json), gates, as_json)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@_guard
def status(job_id: str, as_json: bool) -> None:
    """Show a job: status, stage, progress, metrics, error."""
    with _client() as client:
        job = client.get(job_id)
    if as_json:
        _emit_json(job.model_dump(mode="json"))
    else:
        _job_table(job)
        click.echo(
            f"progress {job.progress * 100:.0f}%, "
            + ", ".join(f"{s.name} {s.status}" for s in job.stages)
        )


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="one JSON event per line")
@_guard
def logs(job_id: str, as_json: bool) -> None:
    """Print a job's events from the start, following it until it ends."""
    with _client() as client:
        for e in client.events(job_id):
            if as_json:
                click.echo(json.dumps({"id": e.id, "type": e.type, **e.data}))
            elif e.type == "status":
                click.echo(f"[{e.data.get('at', '')[:19]}] status {e.data['status']}")
            elif e.type == "stage":
                extra = f" ({e.data['seconds']:.1f}s)" if e.data.get("seconds") else ""
                click.echo(
                    f"[{e.data.get('at', '')[:19]}] stage {e.data['stage']} {e.data['status']}{extra}"
                )
            elif e.type in ("log", "progress") and e.data.get("message"):
                click.echo(
                    f"[{e.data.get('at', '')[:19]}] {e.data.get('stage') or ''}: {e.data['message']}"
                )
            elif e.type == "metrics":
                m = e.data["metrics"]
                click.echo(
                    f"[{e.data.get('at', '')[:19]}] {e.data['model']}: accuracy {m['accuracy']:.4f}, {_fmt_bytes(m['size_bytes'])}, {m['latency_ms']:.3f} ms"
                )
        job = client.get(job_id)
    if job.error is not None and not as_json:  # the last line says why it ended
        click.echo(f"error [{job.error.code}]: {job.error.message}")


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help='{"data": [rows]}, as the API gives it')
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header, the columns of history.csv")
@_guard
def history(job_id: str, as_json: bool, as_csv: bool) -> None:
    """Print a job's training history: one row per epoch of every training run (stage, run,
    epoch, step, lr, loss parts, validation accuracy, seconds)."""
    if as_json and as_csv:
        raise InputError("--json and --csv: choose one")
    with _client() as client:
        if as_csv:
            click.echo(client.history_csv(job_id), nl=False)
            return
        rows = client.history(job_id)
    if as_json:
        _emit_json({"data": [r.model_dump(mode="json") for r in rows]})
        return
    from rich.console import Console
    from rich.table import Table

    from worker.pipeline.history import HISTORY_COLUMNS

    table = Table()
    for col in HISTORY_COLUMNS:
        table.add_column(col, justify="left" if col in ("stage", "run") else "right")
    for r in rows:
        table.add_row(
            r.stage,
            r.run,
            str(r.epoch),
            str(r.step),
            _fmt_num(r.lr, "{:.3g}"),
            *(_fmt_num(v, "{:.4f}") for v in (r.loss, r.task_loss, r.kd_loss, r.feature_loss)),
            _fmt_num(r.val_accuracy, "{:.4f}"),
            f"{r.seconds:.1f}",
        )
    # Eleven columns: piped output (80 columns by default) would fold every cell.
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if not rows:
        click.echo("no epochs recorded yet", err=True)


def _fmt_num(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@_guard
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job (queued: at once; running: at the next batch)."""
    with _client() as client:
        job = client.cancel(job_id)
    _emit_json(job.model_dump(mode="json")) if as_json else click.echo(f"{job.id}: {job.status}")


@main.command("list")
@click.option("--status", "status_", default=None, help="only jobs with this status")
@click.option("--limit", default=20, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@_guard
def list_cmd(status_: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    from rich.console import Console
    from rich.table import Table

    with _client() as client:
        page = client.list(status=status_, limit=limit)
    if as_json:
        _emit_json(page.model_dump(mode="json"))
        return
    table = Table()
    for col in ("id", "name", "status", "stage", "progress", "created"):
        table.add_column(col)
    for j in page.data:
        table.add_row(
            j.id,
            j.name,
            j.status,
            j.stage or "",
            f"{j.progress * 100:.0f}%",
            j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    Console().print(table)


@main.command()
@click.argument("job_id")
@click.argument("names", nargs=-1)
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_guard
def download(job_id: str, names: tuple[str, ...], out_dir: str, as_json: bool) -> None:
    """Download artifacts of JOB_ID (all, or the NAMES given), verify their sha256, and resume
    a download that was cut off."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    with _client() as client:
        artifacts = {a.name: a for a in client.artifacts(job_id)}
        for name in names or tuple(artifacts):
            if name not in artifacts:
                raise InputError(
                    f"job {job_id} has no artifact {name!r}; it has: {', '.join(artifacts)}"
                )
            part = out / (name + ".part")
            resumed = part.stat().st_size if part.exists() else 0
            path = client.download(job_id, name, out)
            done.append(
                {
                    "name": name,
                    "path": str(path),
                    "bytes": artifacts[name].bytes,
                    "sha256": artifacts[name].sha256,
                    "resumed_from": resumed,
                }
            )
            if not as_json:
                note = f" (resumed at byte {resumed})" if resumed else ""
                click.echo(f"{path}  sha256 {artifacts[name].sha256[:16]}… ok{note}")
    if as_json:
        _emit_json(done)


@main.group()
def datasets() -> None:
    """Upload and inspect datasets."""


@datasets.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_guard
def datasets_upload(path: str, as_json: bool) -> None:
    """Upload a .npz or an ImageFolder .zip/.tar.gz; prints its id."""
    with _client() as client:
        ds = client.upload_dataset(path)
    if as_json:
        _emit_json(ds.model_dump(mode="json"))
    else:
        click.echo(
            f"{ds.id}  {ds.num_samples} samples, {ds.num_classes} classes, input {ds.input_shape}"
        )


@main.group()
def models() -> None:
    """Upload and inspect teacher models."""


@models.command("upload")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(["torchscript", "onnx", "safetensors"]), default=None
)
@click.option("--arch", default=None, help="safetensors: the registered architecture")
@click.option("--arch-kwargs", default=None, help="safetensors: JSON object of arch arguments")
@click.option("--input-shape", default=None, help="C,H,W or D, checked against a job's dataset")
@click.option("--num-classes", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@_guard
def models_upload(path, fmt, arch, arch_kwargs, input_shape, num_classes, as_json) -> None:
    """Upload a teacher (TorchScript, ONNX, or safetensors + --arch); prints its id."""
    try:
        shape = [int(v) for v in input_shape.split(",")] if input_shape else None
    except ValueError:
        raise InputError(
            f"--input-shape: expected integers like 3,32,32, got {input_shape!r}"
        ) from None
    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else None
    except json.JSONDecodeError as e:
        raise InputError(f"--arch-kwargs: not valid JSON ({e})") from None
    with _client() as client:
        m = client.upload_model(
            path,
            format=fmt,
            arch=arch,
            arch_kwargs=kwargs,
            input_shape=shape,
            num_classes=num_classes,
        )
    if as_json:
        _emit_json(m.model_dump(mode="json"))
    else:
        click.echo(
            f"{m.id}  {m.format}"
            + (f" {m.arch}" if m.arch else "")
            + (f", input {m.input_shape}" if m.input_shape else "")
            + (f", {m.num_classes} classes" if m.num_classes else "")
        )


if __name__ == "__main__":
    main()
