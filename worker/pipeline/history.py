"""Training curves as data: one row per epoch of every training run, never dropped.

`fit` hands each finished epoch to `StageContext.history`; the runner keeps the rows here, in
`.work/history.jsonl`, so a job that resumes keeps the rows of the epochs it does not run
again, and writes them out as `history.csv` beside report.json.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The columns, in this order, of history.csv, of the API's history rows and of its CSV.
HISTORY_COLUMNS = (
    "stage",  # teacher, baseline, distill, prune
    "run",  # the training run inside the stage: teacher, baseline, distill, finetune1, ...
    "epoch",  # 1-based
    "step",  # optimizer steps so far in that run
    "lr",  # the learning rate at the end of the epoch
    "loss",  # the epoch's mean of what was minimised
    "task_loss",  # cross-entropy on the labels
    "kd_loss",  # the distillation term (null without a teacher)
    "feature_loss",  # the feature term (null without distill.feature)
    "val_accuracy",  # on the validation split after the epoch (null without one)
    "seconds",  # wall time since the run started
)


def replace_from(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[dict[str, Any]]:
    """`rows` plus `row`, which replaces its run's rows from its epoch on: an epoch that runs
    again after a crash (or a run that starts over) is not a second row, and rows of a
    superseded attempt past it do not linger."""
    kept = [r for r in rows if not (r["run"] == row["run"] and r["epoch"] >= row["epoch"])]
    return [*kept, row]


def to_csv(rows: Iterable[dict[str, Any]]) -> str:
    """The rows as CSV with a header; empty cells for nulls."""
    out = io.StringIO()
    writer = csv.DictWriter(out, HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in HISTORY_COLUMNS} for r in rows)
    return out.getvalue()


def log_path(out: Path) -> Path:
    """Where run_pipeline keeps the rows of the job whose output folder is `out`."""
    return out / ".work" / "history.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows a HistoryLog file holds, as it holds them (none when there is no file)."""
    rows: list[dict[str, Any]] = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows = replace_from(rows, json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash mid-write
    return rows


class HistoryLog:
    """The rows of one job, appended to a JSON-lines file as they come (a crash loses none
    that were written), replayed on a resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = read_rows(path)
        text = path.read_text() if path.is_file() else ""
        if text and not text.endswith("\n"):
            with open(path, "a") as f:  # end the cut line, or the next row would extend it
                f.write("\n")

    def add(self, row: dict[str, Any]) -> None:
        self.rows = replace_from(self.rows, row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def write_csv(self, path: Path) -> None:
        path.write_text(to_csv(self.rows))
