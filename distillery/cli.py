"""The `distillery` command: the client commands live here and need only the thin install;
the service's commands (serve, api, worker, migrate, keys, gc, run) live in app/cli_server.py and
load only when called, saying which extra to install when this install lacks it."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from distillery import cli_resources as resources
from distillery.cli_support import (
    EXIT_GATE_FAILED,
    EXIT_INPUT,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    InputError,
    connect,
    guard,
    print_table,
    read_json,
)
from distillery.states import TERMINAL, JobStatus

# The service's commands: the extra each needs, the modules that extra brings (probed, not
# imported), and the line `distillery --help` shows. The API needs the ML stack too: it checks
# every spec by building its models on PyTorch's meta device.
_SERVICE = ("fastapi", "uvicorn", "sqlalchemy", "alembic", "celery", "pydantic_settings")
_ML = ("torch", "torchvision", "onnx", "safetensors", "numpy")
_WORKER = ("torch_pruning", "onnxruntime", "sklearn")
SERVER_COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "serve": ("all", _SERVICE + _ML + _WORKER, "Run the API and one worker together."),
    "api": ("server", _SERVICE + _ML, "Run the API alone (workers run separately)."),
    "worker": ("worker", _SERVICE[2:] + _ML + _WORKER, "Run a worker."),
    "migrate": ("server", ("sqlalchemy", "alembic", "pydantic_settings"), "Migrate the DB."),
    "keys": ("server", ("sqlalchemy", "alembic", "pydantic_settings"), "Manage API keys."),
    "gc": ("server", ("sqlalchemy", "pydantic_settings", "numpy"), "Apply retention now."),
    "run": ("worker", ("pydantic_settings",) + _ML + _WORKER, "Run a job in this process."),
}


def missing_extra(name: str) -> str | None:
    """The message for a service command this install cannot run, or None if it can."""
    extra, modules, _ = SERVER_COMMANDS[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    needs = "the server and worker extras" if extra == "all" else f"the {extra} extra"
    return (
        f"distillery {name} needs {needs} (missing: {', '.join(missing)}): "
        f"pip install 'distillery[{extra}]'"
    )


class _Commands(click.Group):
    """Click exits 2 on a usage error and 1 on its own errors; here both are bad input (5):
    2 means a job failed and 1 a gate failed. Service commands load on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *SERVER_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SERVER_COMMANDS:
            return super().get_command(ctx, name)
        message = missing_extra(name)
        if message is None:
            return getattr(importlib.import_module("app.cli_server"), name)
        return _needs_extra(name, message)

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


def _needs_extra(name: str, message: str) -> click.Command:
    """A stand-in for a command whose extra is missing: says what to install, exits 5."""

    def refuse(**_: Any) -> None:
        click.echo(f"error [missing_extra]: {message}", err=True)
        sys.exit(EXIT_INPUT)

    return click.Command(
        name,
        callback=refuse,
        help=SERVER_COMMANDS[name][2],
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distillery", prog_name="distillery")
def main() -> None:
    """Distillery: distill, prune, quantize and measure PyTorch models."""
    # OpenMP threads that spin while waiting stall badly when a vCPU is descheduled or another
    # process shares the cores (seen here: 10x slower epochs). Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _gates_option(fn):
    def parse(_ctx, _param, values):
        from distillery.gates import parse_gate

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


def _follow_options(fn):
    """--timeout, --progress-interval, the gates and --json: what `submit --wait` and `wait`
    share."""
    fn = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="with --wait: the events as JSON lines, then the result",
    )(fn)
    fn = _gates_option(fn)
    fn = click.option(
        "--progress-interval",
        type=click.FloatRange(min=0),
        default=30.0,
        show_default=True,
        envvar="DISTILLERY_PROGRESS_INTERVAL",
        help="without a terminal (a CI log): at most one progress line per this many seconds",
    )(fn)
    return click.option(
        "--timeout", type=float, default=None, help="give up after this many seconds (exit 3)"
    )(fn)


def verdict(job, gates) -> list[dict[str, Any]]:
    """The spec's gates (checked by the job) and the `--gate` flags as one list: the job's
    verdict, each with its measured value. Empty unless the job succeeded."""
    from distillery.gates import check

    if job.status != JobStatus.SUCCEEDED:
        return []
    results = [g.model_dump(exclude_none=True) for g in job.gates]
    seen = {r["gate"] for r in results}
    results += [check(g, job.metrics).as_dict() for g in gates if g.expr not in seen]
    return results


def _finish(client, job, gates, as_json: bool, *, replayed: bool = False) -> None:
    """Print the outcome and every gate of a finished job (a search's candidates too, and the
    GitHub step summary when running in Actions), then exit with the documented code."""
    from distillery.output import append_step_summary, emit_json, github_summary, job_table
    from distillery.output import print_gates as show_gates

    results = verdict(job, gates)
    passed = all(r["passed"] for r in results)
    table = (
        [c.model_dump(mode="json") for c in client.candidates(job.id)]
        if job.candidates_total
        else []
    )
    if as_json:
        result = {"job": job.model_dump(mode="json"), "gates": results, "gates_passed": passed}
        if table:
            result["candidates"] = table
        emit_json({**result, "replayed": replayed}, lines=True)
    else:
        job_table(job)
        if table:
            from distillery.output import candidate_table, stdout_console

            title = f"{len(table)} candidates: * on the Pareto front, >> the final model"
            stdout_console().print(candidate_table(table, title=title))
        show_gates(results)
    if os.environ.get("GITHUB_STEP_SUMMARY"):
        artifacts = client.artifacts(job.id) if job.status == JobStatus.SUCCEEDED else []
        append_step_summary(github_summary(job, results, artifacts))
    if job.status != JobStatus.SUCCEEDED:
        sys.exit(EXIT_JOB_FAILED)
    sys.exit(EXIT_OK if passed else EXIT_GATE_FAILED)


def _follow(client, job_id: str, timeout: float | None, as_json: bool, interval: float):
    """Follow the job's events to its end (JSON lines, a terminal's bar, or plain lines for a
    log) and return it; exit 3 when `timeout` passes first."""
    from distillery.output import Bar, JsonLines, PlainLines, emit_json

    deadline = None if timeout is None else time.monotonic() + timeout
    if as_json:
        show, live = JsonLines(), contextlib.nullcontext()
    elif sys.stderr.isatty():
        show = live = Bar(job_id)
    else:
        show = PlainLines(interval, lambda line: click.echo(line, err=True))
        live = contextlib.nullcontext()
    with live:
        for event in client.events(job_id, timeout=timeout):
            show(event)
    job = client.get(job_id)
    if job.status not in TERMINAL:
        if deadline is None or time.monotonic() < deadline:  # the stream ended early: poll
            left = None if deadline is None else deadline - time.monotonic()
            return _poll(client, job_id, left, as_json)
        if as_json:
            emit_json(
                {"job": job.model_dump(mode="json"), "gates": [], "timeout": True}, lines=True
            )
        click.echo(f"timeout: job {job.id} still {job.status} after {timeout:.0f}s", err=True)
        sys.exit(EXIT_TIMEOUT)
    return job


def _poll(client, job_id: str, timeout: float | None, as_json: bool):
    from distillery.client import WaitTimeout
    from distillery.output import emit_json

    try:
        return client.wait(job_id, timeout=timeout)
    except WaitTimeout as e:
        if as_json:
            emit_json(
                {"job": e.job.model_dump(mode="json"), "gates": [], "timeout": True}, lines=True
            )
        click.echo(f"timeout: {e}", err=True)
        sys.exit(EXIT_TIMEOUT)


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option(
    "--wait", "wait_", is_flag=True, help="follow the job to its end, then metrics and gates"
)
@click.option(
    "--idempotency-key",
    default=None,
    help="resubmitting with the same key (within IDEMPOTENCY_TTL_SECONDS) returns the same job",
)
@_follow_options
@guard
def submit(
    spec_path: str,
    wait_: bool,
    idempotency_key: str | None,
    timeout: float | None,
    progress_interval: float,
    gates,
    as_json: bool,
) -> None:
    """Submit SPEC (a JSON file, or - for stdin) to the service. Local files the spec names
    (an npz or imagefolder dataset, a TorchScript, ONNX or safetensors teacher) are uploaded
    first (once: an upload of the same bytes is reused) and the spec points at their ids.

    With --wait, the spec's own gates and every --gate make one verdict. Exit codes: 0 done
    and every gate passed (or submitted, without --wait); 1 a gate failed; 2 the job failed,
    was cancelled or was refused; 3 --timeout passed; 4 the service could not be reached or
    refused the key; 5 bad input (an unreadable or invalid JSON file, a bad flag).
    """
    from distillery.output import emit_json
    from distillery.uploads import upload_local_files

    spec = read_json(spec_path, "spec")
    with connect() as client:
        spec = upload_local_files(client, spec, echo=lambda line: click.echo(line, err=True))
        job = client.submit(spec, idempotency_key=idempotency_key)
        said = "replayed" if job.replayed else "submitted"
        if not wait_:
            emit_json(job.model_dump(mode="json")) if as_json else click.echo(job.id)
            if job.replayed:
                click.echo(f"replayed {job.id} (an earlier submit with this key made it)", err=True)
            if gates:
                click.echo("note: --gate is checked only with --wait", err=True)
            return
        click.echo(f"{said} {job.id}", err=True)
        if job.candidates_total:
            click.echo(f"search: {job.candidates_total} candidates", err=True)
        followed = _follow(client, job.id, timeout, as_json, progress_interval)
        _finish(client, followed, gates, as_json, replayed=job.replayed)


@main.command("wait")
@click.argument("job_id")
@_follow_options
@guard
def wait_cmd(
    job_id: str, timeout: float | None, progress_interval: float, gates, as_json: bool
) -> None:
    """Follow JOB_ID to its end; check gates. Output and exit codes as for `submit --wait`."""
    with connect() as client:
        job = _follow(client, job_id, timeout, as_json, progress_interval)
        _finish(client, job, gates, as_json)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@guard
def status(job_id: str, as_json: bool) -> None:
    """Show a job: status, stage, progress, metrics, error."""
    from distillery.output import emit_json, job_table

    with connect() as client:
        job = client.get(job_id)
    if as_json:
        emit_json(job.model_dump(mode="json"))
    else:
        job_table(job)
        click.echo(
            f"progress {job.progress * 100:.0f}%, "
            + ", ".join(f"{s.name} {s.status}" for s in job.stages)
        )


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="one JSON event per line")
@guard
def logs(job_id: str, as_json: bool) -> None:
    """Print a job's events from the start, following it until it ends."""
    from distillery.output import fmt_bytes

    with connect() as client:
        for e in client.events(job_id):
            at = f"[{e.data.get('at', '')[:19]}]"
            if as_json:
                click.echo(json.dumps({"id": e.id, "type": e.type, **e.data}))
            elif e.type == "status":
                click.echo(f"{at} status {e.data['status']}")
            elif e.type == "stage":
                extra = f" ({e.data['seconds']:.1f}s)" if e.data.get("seconds") else ""
                click.echo(f"{at} stage {e.data['stage']} {e.data['status']}{extra}")
            elif e.type in ("log", "progress") and e.data.get("message"):
                click.echo(f"{at} {e.data.get('stage') or ''}: {e.data['message']}")
            elif e.type == "metrics":
                m = e.data["metrics"]
                click.echo(
                    f"{at} {e.data['model']}: accuracy {m['accuracy']:.4f}, "
                    f"{fmt_bytes(m['size_bytes'])}, {m['latency_ms']:.3f} ms"
                )
        job = client.get(job_id)
    if job.error is not None and not as_json:  # the last line says why it ended
        click.echo(f"error [{job.error.code}]: {job.error.message}")


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help='{"data": [rows]}, as the API gives it')
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header, the columns of history.csv")
@guard
def history(job_id: str, as_json: bool, as_csv: bool) -> None:
    """Print a job's training history: one row per epoch of every training run (stage, run,
    epoch, step, lr, loss parts, validation accuracy, seconds)."""
    from distillery.output import emit_json
    from distillery.schemas import HistoryRowPublic

    if as_json and as_csv:
        raise InputError("--json and --csv: choose one")
    with connect() as client:
        if as_csv:
            click.echo(client.history_csv(job_id), nl=False)
            return
        rows = client.history(job_id)
    if as_json:
        emit_json({"data": [r.model_dump(mode="json") for r in rows]})
        return
    from rich.table import Table

    from distillery.output import stdout_console

    table = Table()
    columns = list(HistoryRowPublic.model_fields)  # the columns of history.csv, in order
    for col in columns:
        table.add_column(col, justify="left" if col in ("stage", "run") else "right")
    for r in rows:
        table.add_row(*(_cell(col, getattr(r, col)) for col in columns))
    stdout_console().print(table)  # eleven columns: piped, they would not fit 80
    if not rows:
        click.echo("no epochs recorded yet", err=True)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "lr":
        return f"{value:.3g}"
    if column == "seconds":
        return f"{value:.1f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@guard
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job (queued: at once; running: at the next batch)."""
    from distillery.output import emit_json

    with connect() as client:
        job = client.cancel(job_id)
    emit_json(job.model_dump(mode="json")) if as_json else click.echo(f"{job.id}: {job.status}")


@main.command("delete")
@click.argument("job_id")
@guard
def delete_cmd(job_id: str) -> None:
    """Delete a finished job and its artifacts (refused while it is queued or running)."""
    with connect() as client:
        client.delete(job_id)
    click.echo(f"deleted {job_id}")


@main.command("list")
@click.option("--status", "status_", default=None, help="only jobs with this status")
@click.option("--limit", default=20, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@guard
def list_cmd(status_: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    from distillery.output import emit_json

    with connect() as client:
        page = client.list(status=status_, limit=limit)
    if as_json:
        emit_json(page.model_dump(mode="json"))
        return
    print_table(
        ("id", "name", "status", "stage", "progress", "created"),
        [
            [
                j.id,
                j.name,
                j.status,
                j.stage or "",
                f"{j.progress * 100:.0f}%",
                j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            ]
            for j in page.data
        ],
    )


@main.command()
@click.argument("job_id")
@click.argument("names", nargs=-1)
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
@guard
def download(job_id: str, names: tuple[str, ...], out_dir: str, as_json: bool) -> None:
    """Download artifacts of JOB_ID (all, or the NAMES given; `final` is the final model,
    whichever file holds it), verify their sha256, and resume a download that was cut off."""
    from distillery.client import FINAL
    from distillery.output import emit_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    with connect() as client:
        artifacts = {a.name: a for a in client.artifacts(job_id)}
        final = next((a.name for a in artifacts.values() if a.final), None)
        for asked in names or tuple(artifacts):
            name = final if asked == FINAL and final is not None else asked
            if name not in artifacts:
                raise InputError(
                    f"job {job_id} has no artifact {name!r}; it has: {', '.join(artifacts)}"
                )
            part = out / (name + ".part")
            resumed = part.stat().st_size if part.exists() else 0
            path = client.download(job_id, name, out)
            a = artifacts[name]
            done.append(
                {
                    "name": name,
                    "path": str(path),
                    "bytes": a.bytes,
                    "sha256": a.sha256,
                    "resumed_from": resumed,
                }
            )
            if not as_json:
                note = f" (resumed at byte {resumed})" if resumed else ""
                click.echo(f"{path}  sha256 {a.sha256[:16]}… ok{note}")
    if as_json:
        emit_json(done)


main.add_command(resources.datasets)
main.add_command(resources.models)
main.add_command(resources.webhooks)

if __name__ == "__main__":
    main()
