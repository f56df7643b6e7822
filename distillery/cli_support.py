"""What every `distillery` command shares: the exit codes, the one-line errors, reading a
spec, and the client with its failures mapped to exit codes. Thin: click and the client."""

from __future__ import annotations

import contextlib
import json
import os
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


def connect():
    from distillery.client import Client

    return Client()


def guard(fn):
    """Map client failures to one stderr line and an exit code (never a traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import httpx

        from distillery.client import DEFAULT_URL, ApiError, DownloadError

        try:
            return fn(*args, **kwargs)
        except ApiError as e:
            click.echo(f"error [{e.code}]: {e.message}", err=True)
            sys.exit(api_error_exit(e.status))
        except DownloadError as e:
            click.echo(f"error [download_failed]: {e}", err=True)
            sys.exit(EXIT_JOB_FAILED)
        except httpx.TransportError as e:
            url = os.environ.get("DISTILLERY_URL", DEFAULT_URL)
            click.echo(f"error [unreachable]: cannot reach {url}: {e}", err=True)
            sys.exit(EXIT_UNREACHABLE)

    return wrapper


def api_error_exit(status: int) -> int:
    if status in (401, 403) or status >= 500:
        return EXIT_UNREACHABLE  # the service, or the key, is the problem
    if status == 404:
        return EXIT_INPUT  # a job, artifact or upload id that does not exist
    return EXIT_JOB_FAILED  # refused: an invalid spec (422), a conflict (409)


def print_table(columns: tuple[str, ...], rows: list[list[str]]) -> None:
    from rich.table import Table

    from distillery.output import stdout_console

    table = Table()
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    stdout_console().print(table)


@contextlib.contextmanager
def upload_progress(path: str | Path):
    """A progress callback for a file that goes up in parts: a bar on stderr (bytes, speed,
    time left), or None for a file small enough for one request (no bar to show)."""
    from distillery.resumable import RESUMABLE_ABOVE

    if Path(path).stat().st_size <= RESUMABLE_ABOVE:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(Path(path).name, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
