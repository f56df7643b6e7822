"""The `distillery` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

EXIT_OK, EXIT_GATE_FAILED, EXIT_JOB_FAILED = 0, 1, 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Distillery: distill, prune, quantize and measure PyTorch models."""
    # OpenMP threads that spin while waiting stall badly when a vCPU is descheduled or another
    # process shares the cores (seen here: 10x slower epochs). Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_spec(path: str):
    """Read and validate a spec file; exits 2 with one line per bad field."""
    from pydantic import ValidationError

    from worker.pipeline.spec import JobSpec, format_validation_error

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise click.ClickException(f"cannot read spec {path}: {e.strerror}") from None
    try:
        return JobSpec.model_validate_json(text)
    except ValidationError as e:
        click.echo(f"error [invalid_spec]: {format_validation_error(e)}", err=True)
        sys.exit(EXIT_JOB_FAILED)


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
def run(spec_path: str, out_dir: str, fresh: bool, as_json: bool) -> None:
    """Run a whole job in this process, without the service.

    Exit codes: 0 done and all gates passed, 1 a gate failed, 2 the job failed.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from worker.pipeline.errors import PipelineError
    from worker.pipeline.runner import run_job

    spec = load_spec(spec_path)
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.fields[stage]:<9}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"),
        console=console,
        disable=as_json,
    )
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

    try:
        with progress:
            report = run_job(spec, Path(out_dir), on_event=on_event, resume=not fresh)
    except PipelineError as e:
        # Plain, unwrapped, one line: scripts grep for the code.
        click.echo(f"error [{e.code}]: {e.message}", err=True)
        sys.exit(EXIT_JOB_FAILED)
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to resume")
        sys.exit(130)

    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        console.print(metrics_table(report["metrics"]))
        console.print(final_summary(report["metrics"]["final"]))
        for g in report["gates"]:
            mark = "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"
            console.print(f"gate {g['expr']}: {g['value']:.4f} {mark}")
        console.print(f"artifacts and report.json in {out_dir} ({report['wall_seconds']:.1f}s)")
    sys.exit(EXIT_OK if report["gates_passed"] else EXIT_GATE_FAILED)


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
    import uvicorn

    uvicorn.run(
        "app.main:create_app", factory=True, host=host, port=port, workers=workers, log_level="info"
    )


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
    from worker.celery_app import celery_app

    celery_app.worker_main(
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
    artifacts under DISTILLERY_HOME)."""
    import os
    import subprocess

    import uvicorn

    from app.core.migrate import upgrade

    s = _settings()
    s.home.mkdir(parents=True, exist_ok=True)
    upgrade(s.database_url)
    key = _embedded_key(s)
    env = {**os.environ, "DISTILLERY_HOME": str(s.home)}
    cmd = [sys.executable, "-m", "app.cli", "worker"] + (["-Q", queues] if queues else [])
    worker_proc = subprocess.Popen(cmd, env=env)
    click.echo(f"Distillery on http://{host}:{port}  (home: {s.home})", err=True)
    click.echo(f"API key: {key}", err=True)
    click.echo(f"  curl -H 'Authorization: Bearer {key}' http://{host}:{port}/v1/jobs", err=True)
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level="info")
    finally:
        worker_proc.terminate()
        try:
            worker_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker_proc.kill()


if __name__ == "__main__":
    main()
