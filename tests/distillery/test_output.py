"""Tables on stdout when it is not a terminal (a CI log, a pipe; pytest's capture here): each
at its full width. rich's default there, 80 columns, cut a search's candidate table to "s0-…"
and "0.9…"."""

from __future__ import annotations

from datetime import UTC, datetime

from distillery.output import candidate_table, job_table, stdout_console
from distillery.schemas import JobPublic

MODEL = {"accuracy": 0.987654, "params": 1234567, "size_bytes": 98765432, "latency_ms": 12.3456}
AXES = {
    "student": {"arch": "resnet18", "arch_kwargs": {"widths": [16, 32, 64]}},
    "distill.temperature": 4.0,
    "distill.alpha": 0.9,
    "prune.method": "channel_l2",
    "prune.amount": 0.5,
    "quantize.method": "int8_static",
}


def _candidate(i: int) -> dict:
    metrics = {**MODEL, "accuracy_ci": [0.981234, 0.991234], "accuracy_drop": 0.012345}
    metrics["accuracy_drop_ci"] = [0.004567, 0.020123]
    return {
        "key": f"s{i}-d0-p1-q1",
        "axes": AXES,
        "metrics": metrics,
        "gates": [{"gate": "final.accuracy_drop<=0.02", "value": 0.012, "passed": True}],
        "gates_passed": True,
        "on_front": True,
        "final": i == 0,
    }


def test_a_candidate_table_is_printed_whole(capsys):
    stdout_console().print(candidate_table([_candidate(0), _candidate(1)], title="2 candidates"))
    out = capsys.readouterr().out
    assert "…" not in out
    for cell in (
        "s0-d0-p1-q1",
        "s1-d0-p1-q1",
        'resnet18 {"widths":[16,32,64]}',
        "T=4 a=0.9",
        "channel_l2 0.5",
        "int8_static",
        "0.9877 [0.981, 0.991]",
        "+1.23 [+0.46, +2.01]",
    ):
        assert cell in out, cell
    assert max(len(line) for line in out.splitlines()) > 80  # drawn wider than a terminal


def test_a_jobs_metrics_table_is_printed_whole(capsys):
    now = datetime.now(UTC)
    metrics = {k: MODEL for k in ("teacher", "baseline", "student", "pruned", "quantized")}
    final = {**MODEL, "model": "quantized", "accuracy_drop": 0.0123, "size_ratio": 4.0}
    metrics["final"] = {**final, "speedup": 2.0, "reason": "the smallest passing the gates " * 4}
    job = JobPublic.model_validate(
        {"id": "job_1", "name": "n", "status": "succeeded", "stage": None, "progress": 1.0,
         "stages": [], "metrics": metrics, "error": None, "spec": {}, "queue": "default",
         "attempts": 1, "created_at": now, "started_at": now, "finished_at": now,
         "updated_at": now}
    )  # fmt: skip
    job_table(job)
    out = capsys.readouterr().out
    assert "…" not in out
    assert out.count("0.9877") == 5 and out.count("1,234,567") == 5 and "12.346" in out
    assert ("why: " + metrics["final"]["reason"]).strip() in out  # one line, not folded


def test_a_jobs_sensitivity_table_names_the_costly_nodes_first(capsys):
    """`distillery status` and `submit --wait` show the quantize stage's ranking: each node,
    what returning it to float recovered, its SNR, and whether the job kept it in float."""
    now = datetime.now(UTC)
    rows = [
        {"rank": 1, "node": "/blocks.3/dw/Conv", "op_type": "Conv", "recovered": 0.0312,
         "accuracy_drop": 0.004, "snr_db": 31.25},
        {"rank": 2, "node": "/head/Gemm", "op_type": "Gemm", "recovered": 0.0, "accuracy_drop": 0.035,
         "snr_db": 18.5},
    ]  # fmt: skip
    quantize = {"name": "quantize", "status": "succeeded", "metrics": {
        "sensitivity": rows, "float_nodes": ["/blocks.3/dw/Conv"], "float_share": 0.021}}  # fmt: skip
    job = JobPublic.model_validate(
        {"id": "job_1", "name": "n", "status": "succeeded", "stage": None, "progress": 1.0,
         "stages": [quantize], "metrics": {}, "error": None, "spec": {}, "queue": "default",
         "attempts": 1, "created_at": now, "started_at": now, "finished_at": now,
         "updated_at": now}
    )  # fmt: skip
    job_table(job)
    out = capsys.readouterr().out
    lines = [
        line for line in out.splitlines() if "/blocks.3/dw/Conv" in line or "/head/Gemm" in line
    ]
    assert len(lines) == 2 and "/blocks.3/dw/Conv" in lines[0]  # most sensitive first
    assert "+3.12 pt" in lines[0] and "31.2" in lines[0] and lines[0].rstrip(" │|").endswith("yes")
    assert "+3.50 pt" in lines[1] and not lines[1].rstrip(" │|").endswith("yes")
    assert "1 kept in float (2.1% of the weights)" in out


def test_a_job_without_sensitivity_prints_no_such_table(capsys):
    now = datetime.now(UTC)
    job = JobPublic.model_validate(
        {"id": "job_1", "name": "n", "status": "succeeded", "stage": None, "progress": 1.0,
         "stages": [{"name": "quantize", "status": "succeeded", "metrics": {"accuracy": 0.9}}],
         "metrics": {}, "error": None, "spec": {}, "queue": "default", "attempts": 1,
         "created_at": now, "started_at": now, "finished_at": now, "updated_at": now}
    )  # fmt: skip
    job_table(job)
    assert "sensitivity" not in capsys.readouterr().out
