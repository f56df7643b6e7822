"""Search jobs: what sharing buys, what fan-out buys, and what a search finds.

    python -m bench.search [--parts sharing fanout outcome] [--write docs/BENCHMARKS.md]

1. **sharing**: one search against the same candidates run as separate plain jobs (each
   training its own teacher, baseline and student, pruning and quantizing once), in this
   process: wall time (target <= 0.35x) and each candidate's accuracy both ways.
2. **fanout**: the same search through the service (`api` + workers, PostgreSQL, Redis) with
   1 and with 2 worker processes, one torch thread each: POST -> succeeded (target >= 1.7x
   faster with 2).
3. **outcome**: examples/search_digits.json and examples/search_tabular.json (budget
   `max_accuracy_drop` 0.01) against the default recipes (examples/digits.json,
   examples/tabular.json): the chosen final's size, latency and accuracy with intervals. The
   default recipes' runs also check the plain-job rule: `final` is never bigger than a model
   it came from.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, command_line, machine, utc_now, write_section

NAME = "search"
SHARING_TARGET, FANOUT_TARGET = 0.35, 1.7

# Small enough for a 2-core CPU, big enough that a teacher costs what teachers cost.
SHARED: dict[str, Any] = {
    "name": "bench-sharing",
    "dataset": {"source": "builtin", "name": "digits", "max_samples": 600},
    "teacher": {"source": "train", "arch": "cnn_small", "epochs": 20, "lr": 1e-2, "batch_size": 32},
    "distill": {"epochs": 20, "lr": 1e-2, "batch_size": 32},
    "prune": {"amount": 0.3, "finetune_epochs": 8},
    "quantize": {"method": "int8_dynamic"},
    "evaluate": {"latency_runs": 20, "latency_warmup": 2, "latency_b32_runs": 5},
    "search": {
        "student": [{"arch": "cnn_tiny"}, {"arch": "cnn_tiny", "arch_kwargs": {"widths": [8, 16]}}],
        "prune.amount": [0, 0.3, 0.5],
        "quantize.method": [None, "int8_dynamic"],
    },
}
# Four students of about the same cost: the branches are most of the work.
FANOUT: dict[str, Any] = {
    **SHARED,
    "name": "bench-fanout",
    "dataset": {"source": "builtin", "name": "digits"},
    "teacher": {**SHARED["teacher"], "epochs": 8},
    "distill": {"epochs": 30, "lr": 1e-2, "batch_size": 32},
    "search": {
        "student": [
            {"arch": "cnn_tiny", "arch_kwargs": {"widths": w}}
            for w in ([16, 32], [16, 28], [12, 32], [16, 24])
        ],
        "prune.amount": [0, 0.3],
        "quantize.method": [None],
    },
}


def _plain_specs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(candidate key, the plain spec that makes it, the report model that is it)."""
    from worker.pipeline.search import plan
    from worker.pipeline.spec import JobSpec

    p = plan(JobSpec.model_validate(spec))
    out = []
    for c in p.candidates():
        method, amount = p.prunes[c.prune]
        plain = {k: v for k, v in copy.deepcopy(spec).items() if k != "search"}
        plain["student"] = c.axes["student"]
        plain["prune"] = {**spec["prune"], "method": method, "amount": amount} if amount else None
        quant = p.quants[c.quant]
        plain["quantize"] = {**spec.get("quantize", {}), "method": quant} if quant else None
        model = "quantized" if quant else ("pruned" if amount else "student")
        out.append((c.key, plain, model))
    return out


def sharing(tmp: Path) -> dict[str, Any]:
    from worker.pipeline.runner import run_pipeline
    from worker.pipeline.spec import JobSpec

    t0 = time.perf_counter()
    report = run_pipeline(JobSpec.model_validate(SHARED), tmp / "search")
    search_s = time.perf_counter() - t0
    rows, plain_s = [], 0.0
    for i, (key, spec, model) in enumerate(_plain_specs(SHARED)):
        t0 = time.perf_counter()
        plain = run_pipeline(JobSpec.model_validate(spec), tmp / f"plain-{i}")
        plain_s += time.perf_counter() - t0
        kept = (
            "baseline" if plain["metrics"]["final"].get("student_kept") == "baseline" else "student"
        )
        got = plain["metrics"][kept if model == "student" else model]
        cand = next(c for c in report["candidates"] if c["key"] == key)
        rows.append((key, cand["metrics"], got))
        print(f"  plain job {i + 1}: {key} {got['accuracy']:.4f}", file=sys.stderr)
    return {"search_s": search_s, "plain_s": plain_s, "rows": rows, "n": len(rows)}


def fanout(tmp: Path) -> dict[str, Any]:
    import httpx

    from app.testing import PG_ADMIN, REDIS_URL
    from bench.service_overhead import base_env, distributed_stack

    walls, phases = {}, {}
    for workers in (1, 2):
        with (
            distributed_stack(tmp / f"w{workers}", base_env(1), PG_ADMIN, REDIS_URL, workers) as st,
            httpx.Client(
                base_url=st.url, headers={"Authorization": f"Bearer {st.key}"}, timeout=30
            ) as c,
        ):
            t0 = time.perf_counter()
            job = c.post("/v1/jobs", json=FANOUT).json()
            while (j := c.get(f"/v1/jobs/{job['id']}").json())["status"] not in (
                "succeeded", "failed", "cancelled"
            ):  # fmt: skip
                time.sleep(0.5)
            walls[workers] = time.perf_counter() - t0
            if j["status"] != "succeeded":
                raise RuntimeError(f"the search failed: {j['error']}")
            phases[workers] = _phases(j)
            print(f"  {workers} worker(s): {walls[workers]:.1f} s", file=sys.stderr)
    return {"walls": walls, "speedup": walls[1] / walls[2], "phases": phases}


def _phases(job: dict[str, Any]) -> dict[str, float]:  # {} when a time is missing
    """Seconds from the search's creation to its teacher's end, from there to the export's
    start (the branches: the part that fans out), and from there to the search's end."""
    from datetime import datetime

    stage = {s["name"]: s for s in job["stages"]}
    if not (
        stage.get("teacher", {}).get("finished_at") and stage.get("export", {}).get("started_at")
    ):
        return {}
    teacher_end = datetime.fromisoformat(stage["teacher"]["finished_at"])
    export_start = datetime.fromisoformat(stage["export"]["started_at"])
    return {
        "teacher": (teacher_end - datetime.fromisoformat(job["created_at"])).total_seconds(),
        "branches": (export_start - teacher_end).total_seconds(),
        "rest": (datetime.fromisoformat(job["finished_at"]) - export_start).total_seconds(),
    }


def outcome(tmp: Path) -> list[dict[str, Any]]:
    from worker.pipeline.runner import run_pipeline
    from worker.pipeline.spec import JobSpec

    os.chdir(REPO)  # the tabular examples name their data relative to the repository
    out = []
    for label, search, default in (
        ("digits", "search_digits.json", "digits.json"),
        ("wine (tabular)", "search_tabular.json", "tabular.json"),
    ):
        runs = {}
        for kind, name in (("search", search), ("default", default)):
            spec = JobSpec.model_validate_json((REPO / "examples" / name).read_text())
            t0 = time.perf_counter()
            runs[kind] = run_pipeline(spec, tmp / f"{label[:5]}-{kind}")
            runs[kind]["bench_seconds"] = time.perf_counter() - t0
            print(f"  {label} {kind}: {runs[kind]['bench_seconds']:.0f} s", file=sys.stderr)
        out.append({"label": label, **runs, "rule_ok": _plain_rule_holds(runs["default"])})
    return out


def _plain_rule_holds(report: dict[str, Any]) -> bool:
    """The plain job's final is no bigger than any model it came from (objective size)."""
    m, final = report["metrics"], report["metrics"]["final"]
    chain = {"quantized": ["pruned", "student", "baseline"], "pruned": ["student", "baseline"]}
    return all(
        final["size_bytes"] < m[k]["size_bytes"] for k in chain.get(final["model"], []) if k in m
    )


def _pct(v: float) -> str:
    return f"{v * 100:.1f}"


def _ci(ci: list[float]) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _sharing_md(r: dict[str, Any]) -> list[str]:
    ratio = r["search_s"] / r["plain_s"]
    inside = sum(
        1
        for _, cand, got in r["rows"]
        if cand["accuracy_ci"][0] <= got["accuracy"] <= cand["accuracy_ci"][1]
    )
    lines = [
        f"**Sharing** ({r['n']} candidates, in this process): the search took "
        f"{r['search_s']:.1f} s, the same candidates as {r['n']} plain jobs {r['plain_s']:.1f} s: "
        f"**{ratio:.2f}x** (target <= {SHARING_TARGET}x: "
        f"{'met' if ratio <= SHARING_TARGET else 'missed'}). Each plain job's accuracy fell inside "
        f"the search candidate's 95% interval for {inside} of {r['n']} (the search prunes 0.5 "
        "from the 0.3 model, a plain job from the unpruned one, so those two differ by design).",
        "",
        "| candidate | search accuracy [95% CI] | plain job accuracy |",
        "|---|---:|---:|",
    ]
    for key, cand, got in r["rows"]:
        lines.append(
            f"| {key} | {_pct(cand['accuracy'])} {_ci(cand['accuracy_ci'])} | {_pct(got['accuracy'])} |"
        )
    return lines


def _fanout_md(r: dict[str, Any]) -> list[str]:
    w = r["walls"]
    met = "met" if r["speedup"] >= FANOUT_TARGET else "missed"
    return [
        f"**Fan-out** (`api` + workers, PostgreSQL, Redis; {len(FANOUT['search']['student'])} "
        f"students, one torch thread per worker): POST -> succeeded {w[1]:.1f} s with 1 worker, "
        f"{w[2]:.1f} s with 2: **{r['speedup']:.2f}x** (target >= {FANOUT_TARGET}x: {met}).",
        *(_phases_md(r["phases"]) if all(r["phases"].values()) else []),
    ]


def _phases_md(phases: dict[int, dict[str, float]]) -> list[str]:
    return [
        "",
        "| workers | created -> teacher done (s) | teacher done -> export starts (s) | "
        "-> search done (s) |",
        "|---:|---:|---:|---:|",
        *(
            f"| {n} | {p['teacher']:.1f} | {p['branches']:.1f} | {p['rest']:.1f} |"
            for n, p in phases.items()
        ),
        "",
        f"The branches alone: {phases[1]['branches'] / phases[2]['branches']:.2f}x faster with 2 "
        "workers; the teacher before them and the choice after run once either way.",
    ]


def _outcome_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "**Outcome** at `max_accuracy_drop` 0.01 (one point): the search's final against the "
        "default recipe's final on the same data; intervals are 95% (Wilson for accuracy, paired "
        "bootstrap for the drop).",
        "",
        "| data | run | final | accuracy [CI] % | drop [CI] pt | size | latency b1 ms | gates | wall s |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        for kind in ("default", "search"):
            f = row[kind]["metrics"]["final"]
            lines.append(
                f"| {row['label']} | {kind} | {f['model']} | {_pct(f['accuracy'])} "
                f"{_ci(f['accuracy_ci'])} | {_pct(f['accuracy_drop'])} {_ci(f['accuracy_drop_ci'])} | "
                f"{f['size_bytes'] / 1024:.1f} KB | {f['latency_ms']:.3f} | "
                f"{'pass' if row[kind]['gates_passed'] else 'FAIL'} | {row[kind]['bench_seconds']:.0f} |"
            )
        s, d = row["search"]["metrics"]["final"], row["default"]["metrics"]["final"]
        lines.append(
            f"| {row['label']} | search / default | | | | {s['size_bytes'] / d['size_bytes']:.2f}x | "
            f"{s['latency_ms'] / d['latency_ms']:.2f}x | | |"
        )
    rule = all(row["rule_ok"] for row in rows)
    lines += [
        "",
        f"Plain-job rule on the shipped examples (digits.json, tabular.json): the final model "
        f"is {'never' if rule else 'SOMETIMES'} bigger than a model it was derived from.",
    ]
    return lines


def run(
    profile: str, write: Path | None, parts: tuple[str, ...] = ("sharing", "fanout", "outcome")
) -> bool:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ok, body = True, []
    with tempfile.TemporaryDirectory() as tmp:
        if "sharing" in parts:
            r = sharing(Path(tmp))
            ok &= r["search_s"] / r["plain_s"] <= SHARING_TARGET
            body += [*_sharing_md(r), ""]
        if "fanout" in parts:
            r = fanout(Path(tmp))
            ok &= r["speedup"] >= FANOUT_TARGET
            body += [*_fanout_md(r), ""]
        if "outcome" in parts:
            rows = outcome(Path(tmp))
            ok &= all(row["rule_ok"] for row in rows)
            body += [*_outcome_md(rows), ""]
    text = "\n".join(
        [
            "<!-- search:start -->",
            "## Search jobs: sharing, fan-out, outcome",
            "",
            f"- Command: `{command_line()}`",
            f"- Machine: {machine()}",
            f"- Date: {utc_now()}",
            "",
            *body,
            "<!-- search:end -->",
        ]
    )
    print(text)
    if write is not None:
        write_section(write, NAME, text)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__)
    parser.add_argument("--parts", nargs="+", default=["sharing", "fanout", "outcome"])
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args(argv)
    return 0 if run("default", args.write, tuple(args.parts)) else 1


if __name__ == "__main__":
    sys.exit(main())
