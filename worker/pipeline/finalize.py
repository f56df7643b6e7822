"""The end of a search: every candidate against the teacher, the Pareto front, the choice,
and what the job hands over (the chosen model in the spec's formats, every front
candidate's ONNX, candidates.json, pareto.png, profile.json, report.json, model_card.json)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from distillery.gates import spec_gates
from worker.pipeline import report as reports
from worker.pipeline import speed
from worker.pipeline.choose import Choice, choose, relative
from worker.pipeline.errors import PipelineError
from worker.pipeline.history import HistoryLog
from worker.pipeline.search import (
    EventFn,
    SearchPlan,
    branch_dir,
    candidate_records,
    plan,
    quantize_spec,
    read_json,
    shared_dir,
    subject_arch,
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
    report. Measures only speed, by interleaved runs on this host (a latency from another
    branch's host compares with nothing); the branches measured the rest."""
    started = started if started is not None else time.perf_counter()
    emit: EventFn = on_event or (lambda e: None)
    p = plan(spec)
    teacher = read_json(shared_dir(out) / "teacher.json")
    records = candidate_records(out, p)
    if teacher is None or not records:
        raise PipelineError("the search made no candidate to choose from")
    parents = {k: r["parent"] for k, r in records.items()}
    gates = spec_gates(spec.gates)
    # Every candidate against its parent; against the teacher too when a gate reads it.
    vs_teacher = list(records) if spec.gates.min_speedup is not None else []
    timed = _speed(spec, out, teacher, records, vs_teacher)
    metrics = _against_teacher(out, teacher, records, timed)
    choice = choose(
        metrics, parents, objective=p.objective, gates=gates, max_slowdown=spec.gates.max_slowdown
    )
    if "teacher" not in timed.get(choice.final, {}):  # the report's speedup interval
        timed = _speed(spec, out, teacher, records, [choice.final])
        metrics = _against_teacher(out, teacher, records, timed)
    emit({"type": "log", "stage": "export", "message": f"final: {choice.final}: {choice.reason}"})
    _export(spec, out, p, records, choice)
    candidates = _table(records, metrics, choice)
    (out / "candidates.json").write_text(json.dumps(candidates, indent=2))
    _plot(out / "pareto.png", candidates, teacher["metrics"], spec, p.objective)
    _merged_history(out, p).write_csv(out / "history.csv")
    speed_section = _speed_report(spec, out, p, records, metrics, timed, choice.final)
    result = _report(spec, out, p, teacher, candidates, choice, public_spec, started, speed_section)
    emit({"type": "done", "report": result})
    return result


def _against_teacher(
    out: Path,
    teacher: dict[str, Any],
    records: dict[str, dict[str, Any]],
    timed: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    t_correct = np.load(shared_dir(out) / "teacher_correct.npy")
    return {
        k: relative(
            r["metrics"],
            teacher["metrics"],
            t_correct,
            np.load(branch_dir(out, r["branch"]) / r["files"]["correct"]),
            timed.get(k),
        )
        for k, r in records.items()
    }


def _speed(
    spec: JobSpec,
    out: Path,
    teacher: dict[str, Any],
    records: dict[str, dict[str, Any]],
    vs_teacher: list[str],
) -> dict[str, dict[str, Any]]:
    """Interleaved comparisons, on this host, of each candidate with its parent and those in
    `vs_teacher` with the teacher; kept in .work/speed.json (a finalize run again measures
    only what is missing, and chooses as before)."""
    path = out / ".work" / "speed.json"
    done: dict[str, dict[str, Any]] = read_json(path) or {}
    files = {k: branch_dir(out, r["branch"]) / r["files"]["onnx"] for k, r in records.items()}
    teacher_onnx = shared_dir(out) / "teacher.onnx"
    parents = {k: r["parent"] for k, r in records.items() if "parent" not in done.get(k, {})}
    todo = [k for k in vs_teacher if "teacher" not in done.get(k, {})]
    shape = teacher["input_contract"]["shape"][1:]
    # Latency does not depend on the values: any input of the contract's shape will do.
    sample = np.random.default_rng(spec.seed).normal(size=(1, *shape)).astype(np.float32)
    new = speed.evidence(
        files,
        parents,
        teacher_onnx if teacher_onnx.exists() else None,
        sample,
        spec.evaluate,
        vs_teacher=todo,
        seed=spec.seed,
    )
    for k, v in new.items():
        done.setdefault(k, {}).update(v)
    path.write_text(json.dumps(done))
    return done


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
    arch, kwargs = subject_arch(spec, p.students[final.branch])
    # The folder the teacher phase read the data into: an image cache there is reused.
    data = load_dataset(spec.dataset, spec.seed, workdir=data_dir(out))
    model = load_safetensors(bdir / record["files"]["safetensors"], arch, kwargs, data)
    meta = {"arch": arch, "arch_kwargs": kwargs, "spec": None}
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


def _speed_report(
    spec: JobSpec,
    out: Path,
    p: SearchPlan,
    records: dict[str, dict[str, Any]],
    metrics: dict[str, dict[str, Any]],
    comparisons: dict[str, dict[str, Any]],
    final: str,
) -> dict[str, Any]:
    """The host's int8 capability, the comparisons, why each int8 candidate did or did not
    pay against its float parent; and profile.json, the final model's time per op type."""
    from worker.pipeline.quantize import QUANTIZERS  # onnxruntime, as _export's

    files = {k: branch_dir(out, r["branch"]) / r["files"]["onnx"] for k, r in records.items()}
    int8 = {}
    for key, r in sorted(records.items()):
        c = p.get(key)
        if c.quant > 0 and QUANTIZERS.get(p.quants[c.quant]).int8 and r["parent"] in metrics:
            comparison = comparisons.get(key, {}).get("parent", {}).get("b1")
            parent_ms = metrics[r["parent"]]["latency_ms"]
            int8[key] = speed.int8_verdict(key, parent_ms, files[key], comparison)
    shape = read_json(shared_dir(out) / "teacher.json")["input_contract"]["shape"][1:]
    sample = np.random.default_rng(spec.seed).normal(size=(1, *shape)).astype(np.float32)
    profile = speed.op_profile(files[final], sample, threads=spec.evaluate.threads)
    (out / reports.PROFILE).write_text(json.dumps({"key": final, **profile}, indent=2))
    return {"cpu": speed.host(), "comparisons": comparisons, "int8": int8}


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
    return {**files, **SEARCH_FILES, "history.csv": "csv", reports.PROFILE: "json"}


def _report(
    spec: JobSpec,
    out: Path,
    p: SearchPlan,
    teacher: dict[str, Any],
    candidates: list[dict[str, Any]],
    choice: Choice,
    public_spec: dict[str, Any] | None,
    started: float,
    speed_section: dict[str, Any],
) -> dict[str, Any]:
    chosen = next(c for c in candidates if c["final"])
    final = {**chosen["metrics"], "model": chosen["key"], "axes": chosen["axes"]}
    final["reason"] = choice.reason
    metrics = {"teacher": teacher["metrics"], "final": final}
    public = public_spec if public_spec is not None else spec.model_dump(mode="json")
    made = reports.describe(out, _artifact_files(spec, out, p, choice))
    picked = p.get(choice.final)
    quantizer = p.quants[picked.quant] if picked.quant > 0 else None
    made = reports.mark_final(made, reports.final_file(spec, quantizer))
    search = {
        "objective": p.objective,
        "candidates": p.size,
        "measured": len(candidates),
        "front": choice.front,
        "final": choice.final,
        "excluded": choice.excluded,
        "reason": choice.reason,
    }
    arch, kwargs = subject_arch(spec, p.students[p.get(choice.final).branch])
    card = {
        "name": spec.name,
        "created_at": reports.now(),
        "spec": public,
        "model": {"arch": arch, "arch_kwargs": kwargs, "final": chosen["key"]},
        "input": teacher["input_contract"],
        "metrics": metrics,
        "search": search,
        "quantize": reports.quantize_card(
            quantize_spec(spec, p, picked) if picked.quant > 0 else spec.quantize,
            chosen["metrics"],
        ),
        "speed": speed_section,
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
        "speed": speed_section,
        "stages": [teacher["stage"]],
        "artifacts": made
        + reports.mark_final(reports.describe(out, {"model_card.json": "json"}), None),
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
    """Accuracy against size and against latency: every candidate, the front marked, the
    final marked, the teacher for reference."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(candidates, teacher, spec, objective)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_figure(
    candidates: list[dict[str, Any]], teacher: dict[str, Any], spec: JobSpec, objective: str
) -> Any:
    """pareto.png's matplotlib Figure (the caller closes it)."""
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
        ax.xaxis.set_major_locator(_log_axis_locator(*ax.get_xlim()))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (test split)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{spec.name}: {len(candidates)} candidates, objective {objective}")
    fig.tight_layout()
    return fig


def _log_axis_locator(low: float, high: float) -> Any:
    """Ticks for a log axis from `low` to `high` that leave room for their labels: 1-2-5 per
    decade over a decade or more; over less, where 1-2-5 leaves one tick or none and
    matplotlib falls back to a linear locator with up to 9 ticks (labels ran together,
    "0.00850.009"), at most 4 round values."""
    import matplotlib.ticker

    if high / low >= 10:
        return matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0))
    return matplotlib.ticker.MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10])
