"""The end of a search: every candidate against the teacher, the Pareto front, the choice,
and what the job hands over (the chosen model in the spec's formats, every front
candidate's ONNX, candidates.json, pareto.png, report.json, model_card.json)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from distillery.gates import spec_gates
from worker.pipeline import report as reports
from worker.pipeline.choose import Choice, choose, relative
from worker.pipeline.errors import PipelineError
from worker.pipeline.history import HistoryLog
from worker.pipeline.search import (
    EventFn,
    SearchPlan,
    branch_dir,
    candidate_records,
    plan,
    read_json,
    shared_dir,
)
from worker.pipeline.spec import JobSpec

SEARCH_FILES = {"candidates.json": "json", "pareto.png": "png"}


def front_file(key: str) -> str:
    """The artifact a front candidate's model is published as."""
    return f"candidate-{key}.onnx"


def finalize(
    spec: JobSpec,
    out: Path,
    *,
    on_event: EventFn | None = None,
    public_spec: dict[str, Any] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Choose among every candidate on record and write what the job hands over; returns the
    report. Measures nothing: the branches did."""
    started = started if started is not None else time.perf_counter()
    emit: EventFn = on_event or (lambda e: None)
    p = plan(spec)
    teacher = read_json(shared_dir(out) / "teacher.json")
    records = candidate_records(out, p)
    if teacher is None or not records:
        raise PipelineError("the search made no candidate to choose from")
    metrics = _against_teacher(out, teacher, records)
    parents = {k: r["parent"] for k, r in records.items()}
    choice = choose(metrics, parents, objective=p.objective, gates=spec_gates(spec.gates))
    emit({"type": "log", "stage": "export", "message": f"final: {choice.final}: {choice.reason}"})
    _export(spec, out, p, records, choice)
    candidates = _table(records, metrics, choice)
    (out / "candidates.json").write_text(json.dumps(candidates, indent=2))
    _plot(out / "pareto.png", candidates, teacher["metrics"], spec, p.objective)
    _merged_history(out, p).write_csv(out / "history.csv")
    result = _report(spec, out, p, teacher, candidates, choice, public_spec, started)
    emit({"type": "done", "report": result})
    return result


def _against_teacher(
    out: Path, teacher: dict[str, Any], records: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    t_correct = np.load(shared_dir(out) / "teacher_correct.npy")
    return {
        k: relative(
            r["metrics"],
            teacher["metrics"],
            t_correct,
            np.load(branch_dir(out, r["branch"]) / r["files"]["correct"]),
        )
        for k, r in records.items()
    }


def _table(
    records: dict[str, dict[str, Any]], metrics: dict[str, dict[str, Any]], choice: Choice
) -> list[dict[str, Any]]:
    """candidates.json: one entry per candidate, sorted by key."""
    front = set(choice.front)
    return [
        {
            "key": k,
            "branch": r["branch"],
            "parent": r["parent"],
            "axes": r["axes"],
            "kept": r.get("kept"),
            "metrics": metrics[k],
            "gates": choice.gates[k],
            "gates_passed": all(g["passed"] for g in choice.gates[k]),
            "on_front": k in front,
            "final": k == choice.final,
            "artifacts": [front_file(k)] if k in front else [],
        }
        for k, r in sorted(records.items())
    ]


def _export(
    spec: JobSpec,
    out: Path,
    p: SearchPlan,
    records: dict[str, dict[str, Any]],
    choice: Choice,
) -> None:
    """The chosen model in the spec's export formats (its float weights; when it is a
    quantized model, that file too), and every front candidate's ONNX."""
    from worker.pipeline.data import data_dir, load_dataset
    from worker.pipeline.export import EXPORTERS
    from worker.pipeline.quantize import QUANTIZERS
    from worker.pipeline.teacher import load_safetensors

    final = p.get(choice.final)
    float_key = final.parent if final.quant > 0 else final.key
    assert float_key is not None
    record = records[float_key]
    bdir = branch_dir(out, record["branch"])
    student = p.students[final.branch]
    # The folder the teacher phase read the data into: an image cache there is reused.
    data = load_dataset(spec.dataset, spec.seed, workdir=data_dir(out))
    model = load_safetensors(
        bdir / record["files"]["safetensors"], student.arch, student.arch_kwargs, data
    )
    meta = {"arch": student.arch, "arch_kwargs": student.arch_kwargs, "spec": None}
    for fmt in spec.export:
        exporter = EXPORTERS.get(fmt)
        exporter.run(model, data.x_test[:1], out / exporter.filename, meta)
    if final.quant > 0:
        quantized = QUANTIZERS.get(p.quants[final.quant])
        src = branch_dir(out, final.branch) / records[final.key]["files"]["onnx"]
        shutil.copyfile(src, out / quantized.filename)
    for key in choice.front:
        src = branch_dir(out, records[key]["branch"]) / records[key]["files"]["onnx"]
        shutil.copyfile(src, out / front_file(key))


def _merged_history(out: Path, p: SearchPlan) -> HistoryLog:
    merged = HistoryLog(out / ".work" / "history.jsonl")
    for i in range(len(p.students)):
        for row in HistoryLog(branch_dir(out, i) / "history.jsonl").rows:
            merged.rows.append(row)
    return merged


def _artifact_files(spec: JobSpec, out: Path, p: SearchPlan, choice: Choice) -> dict[str, str]:
    from worker.pipeline.export import EXPORTERS
    from worker.pipeline.quantize import QUANTIZERS

    files = {EXPORTERS.get(f).filename: EXPORTERS.get(f).format for f in spec.export}
    final = p.get(choice.final)
    if final.quant > 0:
        q = QUANTIZERS.get(p.quants[final.quant])
        files[q.filename] = q.format
    files.update({front_file(k): "onnx" for k in choice.front})
    return {**files, **SEARCH_FILES, "history.csv": "csv"}


def _report(
    spec: JobSpec,
    out: Path,
    p: SearchPlan,
    teacher: dict[str, Any],
    candidates: list[dict[str, Any]],
    choice: Choice,
    public_spec: dict[str, Any] | None,
    started: float,
) -> dict[str, Any]:
    chosen = next(c for c in candidates if c["final"])
    final = {**chosen["metrics"], "model": chosen["key"], "axes": chosen["axes"]}
    final["reason"] = choice.reason
    metrics = {"teacher": teacher["metrics"], "final": final}
    public = public_spec if public_spec is not None else spec.model_dump(mode="json")
    made = reports.describe(out, _artifact_files(spec, out, p, choice))
    search = {
        "objective": p.objective,
        "candidates": p.size,
        "measured": len(candidates),
        "front": choice.front,
        "final": choice.final,
        "excluded": choice.excluded,
        "reason": choice.reason,
    }
    student = p.students[p.get(choice.final).branch]
    card = {
        "name": spec.name,
        "created_at": reports.now(),
        "spec": public,
        "model": {"arch": student.arch, "arch_kwargs": student.arch_kwargs, "final": chosen["key"]},
        "input": teacher["input_contract"],
        "metrics": metrics,
        "search": search,
        "artifacts": made,
        "versions": reports.versions(),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2))
    result = {
        "name": spec.name,
        "spec": public,
        "device": teacher["device"],
        "dataset": teacher["dataset"],
        "metrics": metrics,
        "gates": chosen["gates"],
        "gates_passed": choice.gates_passed,
        "search": search,
        "candidates": candidates,
        "stages": [teacher["stage"]],
        "artifacts": made + reports.describe(out, {"model_card.json": "json"}),
        "wall_seconds": time.perf_counter() - started,
        "versions": card["versions"],
    }
    (out / "report.json").write_text(json.dumps(result, indent=2))
    return result


def _plot(
    path: Path,
    candidates: list[dict[str, Any]],
    teacher: dict[str, Any],
    spec: JobSpec,
    objective: str,
) -> None:
    """Accuracy against size and against latency: every candidate, the front joined up, the
    final marked, the teacher for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, label) in zip(
        axes,
        [("size_bytes", "size (KB, log)"), ("latency_ms", "latency batch 1 (ms, log)")],
        strict=True,
    ):
        scale = 1024.0 if metric == "size_bytes" else 1.0
        x = [c["metrics"][metric] / scale for c in candidates]
        y = [c["metrics"]["accuracy"] for c in candidates]
        ax.scatter(x, y, c="#bbbbbb", s=18, label="candidate")
        # The front is over accuracy, size and latency at once: in a 2-D view its points
        # need not line up, so they are marked, not joined.
        front = [c for c in candidates if c["on_front"]]
        ax.scatter(
            [c["metrics"][metric] / scale for c in front],
            [c["metrics"]["accuracy"] for c in front],
            c="#1f77b4",
            s=36,
            label="on the Pareto front",
        )
        final = next(c for c in candidates if c["final"])
        ax.scatter(
            [final["metrics"][metric] / scale],
            [final["metrics"]["accuracy"]],
            marker="*",
            s=220,
            c="#d62728",
            zorder=5,
            label=f"final ({final['key']})",
        )
        ax.axhline(teacher["accuracy"], ls="--", c="#555555", lw=1, label="teacher accuracy")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (test split)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{spec.name}: {len(candidates)} candidates, objective {objective}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
