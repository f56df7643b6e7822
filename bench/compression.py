"""What compression buys: teacher, baseline student (no teacher), distilled student, pruned and
int8 models of whole pipeline runs, over several seeds, measured on ONNX Runtime (CPU).

    python -m bench.compression [--full] [--seeds 0 1 2] [--write docs/BENCHMARKS.md]

For each seed, worker.pipeline.runner.run_pipeline runs examples/digits.json (with
`distill.baseline: true` and that seed) into a temporary folder. Accuracy, size and
parameters come from its report.json (each model measured by the job itself, on the .onnx file
it wrote). Latency at batch 1 and 32 is measured here, after the job, on the same files
(`.work/{teacher,baseline,student,pruned}.onnx` and `model.int8.onnx`) with the job's
EvaluateSpec (ONNX Runtime, CPU, its threads, warm-up and runs; median) in LATENCY_ROUNDS
rounds over the five files in turn, median of the rounds. The job's own batch-1 figure (one
median, taken as each stage finished) is kept beside it: on a busy 2-core machine a single
burst of other work can double the 15 µs median of one model and leave the others alone.

Profiles (`python -m bench` passes one): default = digits on the CPU, seeds 0, 1, 2; full =
also CIFAR-10 (examples/cifar10_resnet18.json, device auto) when its data is under ./data or
can be downloaded; where it cannot, the section says so and no CIFAR-10 numbers are shown.

With --write the section goes into the document and two plots, accuracy against size and
against batch-1 latency, into img/ beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    REPO,
    command_line,
    image_link,
    image_path,
    machine,
    markers,
    utc_now,
    write_section,
)

NAME = "compression"
LATENCY_ROUNDS = 3  # latency: median of this many rounds, each the median of the spec's runs
START, END = markers(NAME)
MODELS = ("teacher", "baseline", "student", "pruned", "quantized")
ROLE = {
    "teacher": "teacher",
    "baseline": "baseline student (no teacher)",
    "student": "distilled student",
    "pruned": "{kept} + pruned",
    "quantized": "{kept} + pruned + int8",
}
# What the pruned and int8 rows start from: the student the pipeline kept (final.student_kept).
KEPT = {"distilled": "distilled", "baseline": "baseline"}


@dataclass(frozen=True)
class Dataset:
    key: str
    title: str
    spec: Path  # relative to the repository


DIGITS = Dataset("digits", "builtin digits", Path("examples/digits.json"))
CIFAR10 = Dataset("cifar10", "CIFAR-10", Path("examples/cifar10_resnet18.json"))


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1  # torch intra-op threads (0: torch's default); see bench.distill_speed
    device: str = "cpu"
    cifar10: bool = False  # try CIFAR-10 too


PROFILE_SETTINGS = {
    "default": Settings(),
    "full": Settings(device="auto", cifar10=True),
}


@dataclass
class Outcome:
    dataset: Dataset
    seeds: list[int] = field(default_factory=list)
    # per seed: model -> accuracy, params, size_bytes, latency_ms (batch 1), latency_b32_ms
    runs: list[dict[str, dict[str, float]]] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # the job's dataset summary
    spec: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why there are no numbers
    kept: list[str] = field(default_factory=list)  # per seed: the student the job kept

    def values(self, model: str, metric: str) -> list[float]:
        return [float(r[model][metric]) for r in self.runs]

    def differences(self, model: str, base: str, metric: str) -> list[float]:
        """model - base for `metric`, per seed (both from the same job)."""
        return [float(r[model][metric]) - float(r[base][metric]) for r in self.runs]

    def ratios(self, model: str, metric: str) -> list[float]:
        """teacher / model, per seed (each pair measured in the same job)."""
        return [
            float(r["teacher"][metric]) / max(float(r[model][metric]), 1e-12) for r in self.runs
        ]


def job_spec(dataset: Dataset, seed: int, device: str):
    from worker.pipeline.spec import JobSpec

    raw = json.loads((REPO / dataset.spec).read_text())
    raw["seed"] = seed
    raw["device"] = device
    raw["distill"] = {**raw.get("distill", {}), "baseline": True}
    return JobSpec.model_validate(raw)


def onnx_files(out: Path, spec) -> dict[str, Path]:
    from worker.pipeline.quantize import QUANTIZERS

    work = out / ".work"
    return {
        "teacher": work / "teacher.onnx",
        "baseline": work / "baseline.onnx",
        "student": work / "student.onnx",
        "pruned": work / "pruned.onnx",
        "quantized": out / QUANTIZERS.get(spec.quantize.method).filename,
    }


def cifar10_unavailable(dataset: Dataset, try_download: bool) -> str | None:
    """Why CIFAR-10 cannot run here, or None when its data is present (or was downloaded)."""
    from torchvision import datasets

    ds = json.loads((REPO / dataset.spec).read_text())["dataset"]
    root = Path(ds.get("root", "./data"))
    download = try_download and bool(ds.get("download", False))
    try:
        datasets.CIFAR10(str(root), train=True, download=download)
    except Exception as e:  # absent, corrupt, or no network for the download
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        how = "downloading it failed" if download else "no download tried"
        return f"no CIFAR-10 under `{root}/` ({how}: {type(e).__name__}: {reason})"
    return None


def measure_seed(dataset: Dataset, seed: int, device: str) -> tuple[dict, float, dict, dict]:
    """One whole job; returns per-model metrics, the job's wall time, its dataset summary and
    its resolved spec."""
    from worker.pipeline.data import load_dataset
    from worker.pipeline.evaluate import latency_ms
    from worker.pipeline.runner import run_pipeline

    spec = job_spec(dataset, seed, device)

    def on_event(e: dict[str, Any]) -> None:
        if e.get("type") == "stage" and e.get("status") == "succeeded":
            print(f"    {e['stage']:<9} {e.get('seconds', 0.0):6.1f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="distillery-bench-compression-") as tmp:
        out = Path(tmp)
        report = run_pipeline(spec, out, on_event=on_event, resume=False)
        data = load_dataset(spec.dataset, spec.seed, workdir=out / ".work")
        sample = data.x_test[:1].numpy()
        files = onnx_files(out, spec)
        # Rounds over all five files in turn, so that a burst of other load on the machine
        # hits every model alike rather than one of them; each value is then the median of
        # the rounds' medians.
        timings: dict[tuple[str, int], list[float]] = {}
        for _ in range(LATENCY_ROUNDS):
            for batch in (1, 32):
                for key, path in files.items():
                    ms = latency_ms(path, sample, spec.evaluate, batch=batch)["latency_ms"]
                    timings.setdefault((key, batch), []).append(ms)
        metrics: dict[str, dict[str, float]] = {}
        for key in files:
            m = report["metrics"][key]
            metrics[key] = {
                "accuracy": float(m["accuracy"]),
                "params": float(m["params"]),
                "size_bytes": float(m["size_bytes"]),
                "latency_ms": statistics.median(timings[key, 1]),
                "latency_b32_ms": statistics.median(timings[key, 32]),
                "job_latency_ms": float(m["latency_ms"]),  # the job's own, for comparison
            }
    kept = report["metrics"]["final"].get("student_kept", "distilled")
    return metrics, float(report["wall_seconds"]), report["dataset"], report["spec"], kept


def measure(dataset: Dataset, settings: Settings) -> Outcome:
    outcome = Outcome(dataset)
    for seed in settings.seeds:
        print(f"  {dataset.key} seed {seed}:", flush=True)
        metrics, wall, summary, spec, kept = measure_seed(dataset, seed, settings.device)
        outcome.seeds.append(seed)
        outcome.kept.append(kept)
        outcome.runs.append(metrics)
        outcome.wall_s.append(wall)
        outcome.summary, outcome.spec = summary, spec
        print(
            "    "
            + ", ".join(
                f"{k} {100 * v['accuracy']:.2f}% {v['size_bytes'] / 1024:.1f} KB "
                f"{v['latency_ms']:.3f}/{v['latency_b32_ms']:.3f} ms"
                for k, v in metrics.items()
            ),
            flush=True,
        )
    return outcome


# --- tables and plots ------------------------------------------------------------------------


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """mean ± std (sample std; ± 0 for one seed)."""
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def span(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{min(values) * scale:.{digits}f}–{max(values) * scale:.{digits}f}"


def model_label(outcome: Outcome, model: str) -> str:
    arch = outcome.spec.get("teacher" if model == "teacher" else "student", {}).get("arch", "")
    kept = set(outcome.kept)
    role = ROLE[model].format(kept=KEPT[kept.pop()] if len(kept) == 1 else "kept student")
    return f"{role} ({arch})" if arch else role


def kept_note(outcome: Outcome) -> str:
    """Which student each seed's job kept, which the pruned and int8 rows start from."""
    by_kind: dict[str, list[str]] = {}
    for seed, kept in zip(outcome.seeds, outcome.kept, strict=True):
        by_kind.setdefault(kept, []).append(str(seed))
    said = "; ".join(
        f"the {'distilled' if k == 'distilled' else 'no-teacher baseline'} student on seed(s) "
        f"{', '.join(seeds)}"
        for k, seeds in sorted(by_kind.items(), key=lambda kv: kv[0] != "distilled")
    )
    return (
        f"The pipeline kept {said} (`final.student_kept`, chosen on the validation split); "
        "the pruned and int8 rows start from the kept student."
    )


def table(outcome: Outcome) -> str:
    lines = [
        "| model | accuracy (%), mean ± std | min–max | params | size (KB) | smaller than "
        "teacher | latency b1 (ms) | faster than teacher, b1 | latency b32 (ms) | faster than "
        "teacher, b32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MODELS:
        lines.append(
            f"| {model_label(outcome, m)} "
            f"| {spread(outcome.values(m, 'accuracy'), 100)} "
            f"| {span(outcome.values(m, 'accuracy'), 100)} "
            f"| {statistics.fmean(outcome.values(m, 'params')):,.0f} "
            f"| {statistics.fmean(outcome.values(m, 'size_bytes')) / 1024:.1f} "
            f"| {statistics.fmean(outcome.ratios(m, 'size_bytes')):.1f}x "
            f"| {spread(outcome.values(m, 'latency_ms'), digits=3)} "
            f"| {statistics.fmean(outcome.ratios(m, 'latency_ms')):.1f}x "
            f"| {spread(outcome.values(m, 'latency_b32_ms'), digits=3)} "
            f"| {statistics.fmean(outcome.ratios(m, 'latency_b32_ms')):.1f}x |"
        )
    return "\n".join(lines)


def findings(outcome: Outcome) -> list[str]:
    gain = outcome.differences("student", "baseline", "accuracy")
    drop = outcome.differences("teacher", "quantized", "accuracy")
    per_seed = " / ".join(f"{100 * g:+.2f}" for g in gain)
    return [
        f"Distilled student minus baseline student: {spread(gain, 100)} pt (per seed {per_seed}).",
        kept_note(outcome),
        f"Teacher minus the final int8 model: {spread(drop, 100)} pt, for a model "
        f"{statistics.fmean(outcome.ratios('quantized', 'size_bytes')):.0f}x smaller and "
        f"{statistics.fmean(outcome.ratios('quantized', 'latency_ms')):.1f}x faster at "
        f"batch 1 ({statistics.fmean(outcome.ratios('quantized', 'latency_b32_ms')):.1f}x "
        "at batch 32).",
        f"int8 against the fp32 pruned model it was made from: "
        f"{_ratio(outcome, 'pruned', 'quantized', 'size_bytes'):.2f}x "
        f"the size, {_ratio(outcome, 'pruned', 'quantized', 'latency_ms'):.2f}x the batch-1 "
        f"and {_ratio(outcome, 'pruned', 'quantized', 'latency_b32_ms'):.2f}x the batch-32 "
        "latency (means over seeds; above 1 means int8 is slower).",
        f"Whole job: {spread(outcome.wall_s, digits=1)} s per seed.",
        job_latency_note(outcome),
    ]


def job_latency_note(outcome: Outcome) -> str:
    """How far the job's own batch-1 latencies are from the benchmark's, worst case first."""
    devs = sorted(
        (
            (r[m]["job_latency_ms"] / r[m]["latency_ms"] - 1, m, seed)
            for seed, r in zip(outcome.seeds, outcome.runs, strict=True)
            for m in MODELS
        ),
        key=lambda d: -abs(d[0]),
    )
    worst, model, seed = devs[0]
    median = statistics.median(abs(d[0]) for d in devs)
    return (
        "The job's own batch-1 latencies (report.json) differ from these by "
        f"{100 * median:.0f}% at the median and {100 * worst:+.0f}% at worst ({model}, seed "
        f"{seed})."
    )


def _ratio(outcome: Outcome, base: str, model: str, metric: str) -> float:
    """model / base for `metric`, per seed, averaged."""
    return statistics.fmean(
        m / max(b, 1e-12)
        for m, b in zip(outcome.values(model, metric), outcome.values(base, metric), strict=True)
    )


# Baseline and distilled student have the same size (and about the same latency): the
# baseline is drawn hollow and larger so that the student's marker shows inside it.
MARKERS = {
    "teacher": dict(marker="o", ms=7),
    "baseline": dict(marker="s", ms=11, mfc="none", mew=1.5),
    "student": dict(marker="D", ms=6),
    "pruned": dict(marker="^", ms=8),
    "quantized": dict(marker="v", ms=8),
}
COLORS = {
    "teacher": "#1f77b4",
    "baseline": "#7f7f7f",
    "student": "#2ca02c",
    "pruned": "#ff7f0e",
    "quantized": "#d62728",
}


def plot(
    outcomes: list[Outcome],
    x_metric: str,
    x_scale: float,
    x_label: str,
    title: str,
    caption: str,
    path: Path,
) -> None:
    """Accuracy against `x_metric` (log x): one panel per dataset, each model's seeds as faint
    dots and their mean with ±1 std error bars on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(outcomes), figsize=(7.5 * len(outcomes), 5.8), squeeze=False)
    for ax, outcome in zip(axes[0], outcomes, strict=True):
        for m in MODELS:
            xs = [v * x_scale for v in outcome.values(m, x_metric)]
            ys = [100 * v for v in outcome.values(m, "accuracy")]
            ax.scatter(xs, ys, s=14, color=COLORS[m], alpha=0.35, linewidths=0)
            ax.errorbar(
                statistics.fmean(xs),
                statistics.fmean(ys),
                xerr=statistics.stdev(xs) if len(xs) > 1 else None,
                yerr=statistics.stdev(ys) if len(ys) > 1 else None,
                linestyle="none",
                color=COLORS[m],
                **MARKERS[m],
                capsize=3,
                label=model_label(outcome, m),
            )
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(
            f"{outcome.dataset.title}: {len(outcome.seeds)} seeds "
            f"({', '.join(map(str, outcome.seeds))})",
            fontsize=10,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=12)
    # The caption (command, machine, date) goes inside the image, so it travels with it.
    fig.text(0.01, 0.01, textwrap.fill(caption, width=110 * len(outcomes)), fontsize=7)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def section(
    command: str,
    where: str,
    date: str,
    settings: Settings,
    outcomes: list[Outcome],
    images: list[tuple[str, str]],
) -> str:
    measured = [o for o in outcomes if o.skipped is None]
    lines = [
        START,
        "## What compression buys: teacher, baseline, distilled, pruned, int8",
        "",
        "Whole pipeline runs (`worker.pipeline.runner.run_pipeline`) of the example spec with "
        "`distill.baseline: true`, one per seed; every model is measured on ONNX Runtime "
        "(CPU, 1 intra-op thread: the spec's `evaluate`) from the .onnx file the job wrote. "
        "Accuracy, size and parameters are the job's own report.json numbers. Latency at "
        "batch 1 and 32 is measured by the benchmark right after each job, on the same files "
        "with the same settings (the median of the spec's `latency_runs`), in "
        f"{LATENCY_ROUNDS} rounds over the five models in turn, median of the rounds; the "
        "job's own batch-1 figures are compared below. Ratios are "
        "teacher / model within each seed's job, then averaged over seeds; ± is the sample "
        "standard deviation over seeds.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {where}",
        f"- Date: {date}",
        f"- Setup: seeds {', '.join(map(str, settings.seeds))}, torch threads "
        f"{settings.threads or 'default'}, device {settings.device}",
    ]
    for o in outcomes:
        lines += ["", f"### {o.dataset.title} (`{o.dataset.spec.as_posix()}`)", ""]
        if o.skipped is not None:
            lines.append(f"Not measured: {o.skipped}.")
            continue
        s = o.spec
        lines += [
            f"Data: {o.summary.get('num_train')} train / {o.summary.get('num_test')} test "
            f"samples, {o.summary.get('num_classes')} classes; teacher {s['teacher']['arch']} "
            f"{s['teacher'].get('epochs')} epochs, student {s['student']['arch']} "
            f"{s['distill']['epochs']} epochs (KD T={s['distill']['temperature']} "
            f"alpha={s['distill']['alpha']}), prune {s['prune']['method']} "
            f"{s['prune']['amount']} + {s['prune']['finetune_epochs']} fine-tune epochs, "
            f"quantize {s['quantize']['method']}; one test sample is "
            f"{100 / max(int(o.summary.get('num_test') or 1), 1):.2f} pt of accuracy.",
            "",
            table(o),
            "",
            *[f"- {f}" for f in findings(o)],
        ]
    if not any(o.dataset.key == "cifar10" for o in outcomes):
        why = cifar10_unavailable(CIFAR10, try_download=False)
        lines += [
            "",
            "### CIFAR-10 (`examples/cifar10_resnet18.json`)",
            "",
            "Not measured in this run: CIFAR-10 is in the `--full` profile only (a GPU host "
            "with the data under `./data` or a network to download it). "
            + (
                f"On this machine: {why}."
                if why is not None
                else "This machine has the data: `python -m bench --full` measures it."
            ),
        ]
    if measured and images:
        lines.append("")
        for alt, link in images:
            lines.append(f"![{alt}]({link})")
    lines.append(END)
    return "\n".join(lines)


def bench(settings: Settings, write: Path | None, command: str) -> bool:
    """Run every dataset of `settings`, print the tables, write section and plots. There is no
    target here, so True unless something failed (which raises)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    datasets = [DIGITS, *([CIFAR10] if settings.cifar10 else [])]
    outcomes: list[Outcome] = []
    for dataset in datasets:
        if dataset is CIFAR10:
            why = cifar10_unavailable(dataset, try_download=True)
            if why is not None:
                print(f"  {dataset.key}: skipped: {why}")
                outcomes.append(Outcome(dataset, skipped=why))
                continue
        started = time.perf_counter()
        outcomes.append(measure(dataset, settings))
        print(f"  {dataset.key}: {time.perf_counter() - started:.0f} s")
    from worker.pipeline.context import resolve_device

    where = machine(resolve_device(settings.device))
    date = utc_now()
    for o in outcomes:
        if o.skipped is None:
            print()
            print(f"{o.dataset.title}:")
            print(table(o))
            for f in findings(o):
                print(f"- {f}")
    if write is not None:
        measured = [o for o in outcomes if o.skipped is None]
        caption = f"Command: {command}  |  Machine: {where}  |  Date: {date}"
        images = []
        for what, metric, scale, label, title in (
            ("accuracy_size", "size_bytes", 1 / 1024, "ONNX file size (KB, log scale)", "size"),
            (
                "accuracy_latency",
                "latency_ms",
                1.0,
                "ONNX Runtime CPU latency, batch 1 (ms, median of runs; log scale)",
                "batch-1 latency",
            ),
        ):
            path = image_path(write, NAME, what)
            plot(measured, metric, scale, label, f"Accuracy against {title}", caption, path)
            images.append((f"Accuracy against {title}", image_link(write, path)))
            print(f"wrote {path}")
        write_section(write, NAME, section(command, where, date, settings, outcomes, images))
        print(f"wrote {write}")
    return True


def run(profile: str, write: Path | None) -> bool:
    """Entry point for `python -m bench` (see bench/README.md); no target: True when it ran."""
    return bench(PROFILE_SETTINGS[profile], write, command_line())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compression",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--full", action="store_true", help="the GPU-host profile (adds CIFAR-10)")
    parser.add_argument("--seeds", type=int, nargs="+", help="job seeds (default 0 1 2)")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (1; 0: torch's default)"
    )
    parser.add_argument("--device", help="cpu, cuda or auto for training (default cpu, full auto)")
    parser.add_argument("--write", type=Path, help="(re)write the section (and plots) here")
    args = parser.parse_args(argv)
    settings = PROFILE_SETTINGS["full" if args.full else "default"]
    if args.seeds:
        settings = replace(settings, seeds=tuple(args.seeds))
    if args.threads is not None:
        settings = replace(settings, threads=args.threads)
    if args.device:
        settings = replace(settings, device=args.device)
    if settings.threads < 0 or any(s < 0 for s in settings.seeds):
        parser.error("--threads and --seeds must be at least 0")
    command = (
        command_line() if argv is None else shlex.join(["python", "-m", "bench.compression", *argv])
    )
    return 0 if bench(settings, args.write, command) else 1


if __name__ == "__main__":
    sys.exit(main())
