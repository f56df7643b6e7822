"""How the `distillery` command shows a job: the metrics table, the final line, the gates,
a live progress bar on a terminal, plain timestamped lines in a CI log, JSON lines for
machines, and a Markdown summary for GitHub Actions. Rich is imported only where drawn."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from distillery.client import Event
from distillery.schemas import ArtifactPublic, JobPublic
from distillery.states import JobStatus, StageStatus

MODELS = ("teacher", "baseline", "student", "pruned", "quantized")


# Wider than any table here: rich then draws each at its natural width.
UNBOUNDED = 10_000


def stdout_console():
    """rich's Console for stdout: a terminal's width, else (a CI log, a pipe) as wide as each
    table needs. rich's default there is 80 columns, which cut cells short ("s0-…", "0.9…")."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=UNBOUNDED)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def emit_json(obj: Any, *, lines: bool = False) -> None:
    """JSON on stdout: indented for a person, or one line (JSON lines, for a stream)."""
    click.echo(json.dumps(obj, default=str, indent=None if lines else 2))


def print_gates(results: list[dict[str, Any]], echo: Callable[[str], None] = click.echo) -> None:
    """One line per gate with its measured value: `gate final.size_ratio>=20: 222.9 pass`."""
    for r in results:
        value = "not measured" if r["value"] is None else f"{r['value']:.6g}"
        missed = f" (missed by {r['missed_by']:.4g})" if r.get("missed_by") else ""
        echo(f"gate {r['gate']}: {value} {'pass' if r['passed'] else 'FAIL'}{missed}")


def metric_rows(metrics: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The models' rows of the metrics table: model, accuracy, params, size, latency."""
    rows = []
    for key in MODELS:
        if key in metrics:
            m = metrics[key]
            rows.append(
                [
                    key,
                    f"{m['accuracy']:.4f}",
                    f"{m['params']:,}",
                    fmt_bytes(m["size_bytes"]),
                    f"{m['latency_ms']:.3f}",
                ]
            )
    return rows


METRIC_COLUMNS = ("model", "accuracy", "params", "size", "latency ms")


def metrics_table(metrics: dict[str, dict[str, Any]]):
    from rich.table import Table

    table = Table(title="metrics (ONNX Runtime, CPU, batch 1)")
    for col in METRIC_COLUMNS:
        table.add_column(col, justify="right" if col != "model" else "left")
    for row in metric_rows(metrics):
        table.add_row(*row)
    return table


def _pt(value: float) -> str:
    return f"{value * 100:+.2f}"


def drop_text(m: dict[str, Any]) -> str:
    """The accuracy drop in points, with its paired 95% interval when there is one."""
    ci = m.get("accuracy_drop_ci")
    return f"{_pt(m['accuracy_drop'])} pt" + (f" [{_pt(ci[0])}, {_pt(ci[1])}]" if ci else "")


def speed_text(m: dict[str, Any]) -> str:
    """The speedup over the teacher: its 95% interval from interleaved runs when the job
    measured one (two medians alone can be far off on a busy host)."""
    ci = m.get("speedup_ci")
    if ci is None:
        return f"{m['speedup']:.1f}x faster (medians)"
    return f"{ci[0]:.2f}-{ci[1]:.2f}x the teacher's speed (95%, {m.get('speedup_verdict', '')})"


def final_summary(final: dict[str, Any]) -> str:
    parts = [
        f"final = {final['model']}",
        f"accuracy drop {drop_text(final)}",
        f"{final['size_ratio']:.1f}x smaller",
        speed_text(final),
    ]
    if "distill_gain" in final:
        parts.append(f"distillation vs no teacher {final['distill_gain'] * 100:+.2f} pt")
    if final.get("student_kept") == "baseline":
        parts.append("kept the student trained without a teacher (it scored higher on validation)")
    summary = ", ".join(parts)
    return summary + (f"\nwhy: {final['reason']}" if final.get("reason") else "")


def _axes_label(axes: dict[str, Any]) -> tuple[str, str, str, str]:
    student = axes["student"]
    if student is None:  # a search compressing the teacher itself
        arch = "(the teacher)"
    else:
        kwargs = student.get("arch_kwargs") or {}
        arch = student["arch"] + (
            "" if not kwargs else " " + json.dumps(kwargs, separators=(",", ":"))
        )
        arch += " (pretrained)" if student.get("init") else ""
    prune = "-" if not axes["prune.amount"] else f"{axes['prune.method']} {axes['prune.amount']:g}"
    recipe = f"T={axes['distill.temperature']:g} a={axes['distill.alpha']:g}"
    quant = axes["quantize.method"] or "float"
    if axes.get("quantize.calibration"):  # int8_static: which calibration made it
        quant += f" ({axes['quantize.calibration']})"
    return arch, recipe, prune, quant


CANDIDATE_COLUMNS = ("", "key", "student", "recipe", "prune", "quant", "accuracy [95% CI]",
                     "drop pt [95% CI]", "size", "ms b1", "gates")  # fmt: skip


def candidate_table(candidates: list[dict[str, Any]], *, title: str = "candidates"):
    """A search's candidates: axes, accuracy with its interval, size, latency, the Pareto
    front (*), the final model (>>) and each one's gates."""
    from rich.table import Table

    table = Table(title=title)
    for col in CANDIDATE_COLUMNS:
        table.add_column(col, justify="right" if col in ("size", "ms b1") else "left")
    for c in candidates:
        m = c["metrics"]
        lo, hi = m.get("accuracy_ci") or (m["accuracy"], m["accuracy"])
        mark = ">>" if c["final"] else ("*" if c["on_front"] else "")
        gates = "-" if not c.get("gates") else ("pass" if c["gates_passed"] else "FAIL")
        table.add_row(
            mark,
            c["key"],
            *_axes_label(c["axes"]),
            f"{m['accuracy']:.4f} [{lo:.3f}, {hi:.3f}]",
            drop_text(m).removesuffix(" pt").replace(" pt", ""),
            fmt_bytes(m["size_bytes"]),
            f"{m['latency_ms']:.3f}",
            gates,
        )
    return table


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


SENSITIVITY_ROWS = 10  # the most sensitive nodes shown; sensitivity.csv has them all


def sensitivity_table(job: JobPublic):
    """The quantize stage's per-node sensitivity (most sensitive first) and the nodes it kept
    in float, or None when the job did not score its nodes."""
    from rich.table import Table

    metrics = next((s.metrics for s in job.stages if s.name == "quantize"), {})
    rows = metrics.get("sensitivity") or []
    if not rows:
        return None
    kept, share = set(metrics.get("float_nodes", [])), metrics.get("float_share")
    caption = f"{len(rows)} nodes scored; {len(kept)} kept in float" + (
        f" ({share * 100:.1f}% of the weights)" if share is not None else ""
    )
    table = Table(
        title="int8 sensitivity: each node returned alone to float (validation sample)",
        caption=caption,
    )
    for col in ("rank", "node", "op", "recovered", "drop vs float", "SNR dB", "float"):
        table.add_column(col, justify="left" if col in ("node", "op") else "right")
    for r in rows[:SENSITIVITY_ROWS]:
        table.add_row(
            str(r["rank"]),
            r["node"],
            r["op_type"],
            f"{_pt(r['recovered'])} pt",
            f"{_pt(r['accuracy_drop'])} pt",
            f"{r['snr_db']:.1f}",
            "yes" if r["node"] in kept else "",
        )
    return table


def job_table(job: JobPublic) -> None:
    # Plain lines for the id and the error: scripts grep them, and rich would wrap them.
    stage = f" ({job.stage})" if job.stage and job.status != JobStatus.SUCCEEDED else ""
    click.echo(f"{job.id} {job.name}: {job.status}{stage}")
    if job.error:
        click.echo(f"error [{job.error.code}]: {job.error.message}")
    console = stdout_console()
    if any(k in job.metrics for k in ("teacher", "student")):
        console.print(metrics_table(job.metrics))
    if "final" in job.metrics:
        console.print(final_summary(job.metrics["final"]))
    sensitivity = sensitivity_table(job)
    if sensitivity is not None:
        console.print(sensitivity)


# --- following a job: three displays of one event stream ---------------------------------------


def _stamp(at: str | None) -> str:
    """An event's time as `2026-05-01T12:00:03Z` (second resolution, UTC)."""
    try:
        when = datetime.fromisoformat(at) if at else datetime.now(UTC)
    except ValueError:
        when = datetime.now(UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(at: str | None) -> float | None:
    try:
        return datetime.fromisoformat(at).timestamp() if at else None
    except ValueError:
        return None


class PlainLines:
    """For a log, not a terminal: one line per status change, stage start and end and log
    line, and at most one progress line every `interval` seconds (of the job's own clock, so
    a replayed stream prints what a live one would have)."""

    def __init__(self, interval: float, echo: Callable[[str], None]) -> None:
        self.interval, self.echo = interval, echo
        self._last_progress: float | None = None

    def __call__(self, e: Event) -> None:
        d, at = e.data, _stamp(e.data.get("at"))
        if e.type == "status":
            self.echo(f"{at} status {d['status']}")
        elif e.type == "stage":
            self.echo(f"{at} stage {d['stage']} {_stage_word(d)}")
        elif e.type == "log" and d.get("message"):
            self.echo(f"{at} {d.get('stage') or 'job'}: {d['message']}")
        elif e.type == "progress" and self._due(_when(d.get("at"))):
            message = f": {d['message']}" if d.get("message") else ""
            self.echo(f"{at} progress {d['progress'] * 100:.0f}% {d['stage']}{message}")

    def _due(self, when: float | None) -> bool:
        if when is None:
            return False
        if self._last_progress is not None and when - self._last_progress < self.interval:
            return False
        self._last_progress = when
        return True


def _took(d: dict[str, Any]) -> str:
    return "resumed from checkpoint" if d.get("resumed") else f"{d.get('seconds') or 0:.1f}s"


def _stage_word(d: dict[str, Any]) -> str:
    if d["status"] == StageStatus.RUNNING:
        return "started"
    if d["status"] == StageStatus.SUCCEEDED:
        return f"succeeded ({_took(d)})"
    return d["status"]


class JsonLines:
    """Each event as one JSON line on stdout: `{"id", "type", …its data}`."""

    def __call__(self, e: Event) -> None:
        emit_json({"id": e.id, "type": e.type, **e.data}, lines=True)


class Bar:
    """A terminal's live bar (stage, percent, elapsed) with a line per finished stage."""

    def __init__(self, job_id: str) -> None:
        from rich.console import Console

        self.progress = progress_bar(Console(stderr=True), disable=False)
        self.task = self.progress.add_task(
            job_id, total=1.0, stage=JobStatus.QUEUED.value, message=""
        )

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, e: Event) -> None:
        d = e.data
        if e.type == "progress":
            message = (d.get("message") or "")[:60]
            self.progress.update(
                self.task, completed=d["progress"], stage=d["stage"], message=message
            )
        elif e.type == "status":
            self.progress.update(self.task, message=d["status"])
        elif e.type == "stage" and d["status"] == StageStatus.SUCCEEDED:
            self.progress.console.print(f"[green]✓[/] {d['stage']} ({_took(d)})")


# --- GitHub Actions ------------------------------------------------------------------------------


def github_summary(
    job: JobPublic, gates: list[dict[str, Any]], artifacts: list[ArtifactPublic]
) -> str:
    """The job as Markdown for the workflow run's summary page: outcome, metrics, the
    verdict of every gate, and each artifact with its sha256."""
    lines = [f"### Distillery `{job.id}` ({job.name}): {job.status}", ""]
    if job.error is not None:
        lines += [f"**error** `{job.error.code}`: {job.error.message}", ""]
    rows = metric_rows(job.metrics)
    if rows:
        lines += _md_table(METRIC_COLUMNS, rows)
    if "final" in job.metrics:
        lines += [final_summary(job.metrics["final"]), ""]
    if gates:
        verdict = "all gates passed" if all(g["passed"] for g in gates) else "a gate FAILED"
        lines += [f"**Gates**: {verdict}", ""]
        lines += _md_table(
            ("gate", "measured", "verdict"),
            [
                [
                    f"`{g['gate']}`",
                    "not measured" if g["value"] is None else f"{g['value']:.6g}",
                    "✅ pass" if g["passed"] else "❌ FAIL",
                ]
                for g in gates
            ],
        )
    if artifacts:
        lines += ["**Artifacts**", ""]
        lines += _md_table(
            ("name", "size", "sha256"),
            [[f"`{a.name}`", fmt_bytes(a.bytes), f"`{a.sha256}`"] for a in artifacts],
        )
    return "\n".join(lines) + "\n"


def _md_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def append_step_summary(markdown: str) -> Path | None:
    """Append to $GITHUB_STEP_SUMMARY when GitHub Actions set it (other steps write there
    too: append, never replace). Returns the file, or None outside Actions."""
    name = os.environ.get("GITHUB_STEP_SUMMARY")
    if not name:
        return None
    path = Path(name)
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown)
    return path
