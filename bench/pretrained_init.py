"""What starting a student from pretrained weights buys: the same job, on the same data and
seed, with `student.init` naming weights trained on a related task, against the student
from random weights.

The two tasks are made from scikit-learn's digits, split in two disjoint halves: task A is
"which digit" (10 classes) on one half, task B "even or odd" (2 classes) on the other, with
few training samples (12 % of the split; the other 88 % is the test split, ~790 samples). A
first job trains a cnn_small on task A and exports `model.safetensors`; each task-B job
starts its student (baseline and distilled alike) from that file, whose 10-class head is
replaced for task B's 2 classes.

    python -m bench.pretrained_init [--seeds 0 1 2 3 4] [--write docs/BENCHMARKS.md]

Target: the pretrained-init student's mean test accuracy is above the one from scratch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import command_line, machine, utc_now, write_section

STUDENT = "cnn_small"
# Task B as pretrained weights are meant for: few samples (~80 to train on), a short run.
TEST_FRACTION, FINETUNE_EPOCHS = 0.88, 10
COMMON = {
    "teacher": {"arch": "cnn_large", "epochs": 30},
    "prune": None,
    "quantize": None,
    "evaluate": {"latency_runs": 5, "latency_warmup": 1, "latency_b32_runs": 0},
}


def make_tasks(folder: Path) -> tuple[Path, Path]:
    """Task A (which digit, 10 classes) on one half of the digits, task B (even or odd, 2
    classes) on the other half, as .npz uploads: no sample is in both."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    half_a, half_b = order[: len(x) // 2], order[len(x) // 2 :]
    path_a, path_b = folder / "task_a.npz", folder / "task_b.npz"
    np.savez(path_a, x=x[half_a], y=digits.target[half_a], classes=np.arange(10).astype(str))
    np.savez(path_b, x=x[half_b], y=digits.target[half_b] % 2, classes=np.array(["even", "odd"]))
    return path_a, path_b


def pretrain(task_a: Path, out: Path) -> Path:
    """A job on task A whose student is the weights task B starts from."""
    from worker.pipeline.runner import run_pipeline
    from worker.pipeline.spec import JobSpec

    spec = {
        **COMMON,
        "dataset": {"source": "npz", "path": str(task_a)},
        "student": {"arch": STUDENT},
        "distill": {"baseline": False},
        "export": ["safetensors"],
    }
    report = run_pipeline(JobSpec.model_validate(spec), out)
    print(f"pretrained on task A: accuracy {report['metrics']['final']['accuracy']:.4f}")
    return out / "model.safetensors"


def finetune(task_b: Path, init: Path | None, seed: int, out: Path) -> dict:
    """One task-B job; returns the handed-over student's accuracy and which test samples it
    got right (for the paired interval)."""
    from worker.pipeline.runner import run_pipeline
    from worker.pipeline.spec import JobSpec

    student: dict = {"arch": STUDENT}
    if init is not None:
        student["init"] = {"source": "safetensors", "path": str(init)}
    spec = {
        **COMMON,
        "dataset": {"source": "npz", "path": str(task_b), "test_fraction": TEST_FRACTION},
        "student": student,
        "distill": {"epochs": FINETUNE_EPOCHS},
        "export": [],
        "seed": seed,
    }
    report = run_pipeline(JobSpec.model_validate(spec), out)
    final = report["metrics"]["final"]
    correct = np.load(out / ".work" / "state" / "correct" / f"{final['model']}.npy")
    return {
        "accuracy": final["accuracy"],
        "ci": final["accuracy_ci"],
        "correct": correct,
        "kept": final.get("student_kept"),
        "init": report["init"],
        "train": report["dataset"]["num_train"],
        "test": report["dataset"]["num_test"],
    }


def measure(seeds: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        task_a, task_b = make_tasks(folder)
        weights = pretrain(task_a, folder / "pretrain")
        for seed in seeds:
            scratch = finetune(task_b, None, seed, folder / f"scratch{seed}")
            init = finetune(task_b, weights, seed, folder / f"init{seed}")
            rows.append({"seed": seed, "scratch": scratch, "init": init})
            print(
                f"seed {seed}: scratch {scratch['accuracy']:.4f} init {init['accuracy']:.4f}",
                flush=True,
            )
    return rows


def paired_gain_ci(init: np.ndarray, scratch: np.ndarray) -> tuple[float, float]:
    """95% bootstrap interval of init accuracy minus scratch accuracy, on the same samples."""
    from worker.pipeline.stats import paired_drop_ci

    low, high = paired_drop_ci(scratch, init)  # scratch - init
    return -high, -low


def render(rows: list[dict], passed: bool) -> str:
    pt = lambda v: f"{v * 100:.2f}"  # noqa: E731
    ci = lambda c: f"[{pt(c[0])}, {pt(c[1])}]"  # noqa: E731
    first = rows[0]["init"]
    info = first["init"]["student.init"]
    mean = {k: statistics.mean(r[k]["accuracy"] for r in rows) for k in ("scratch", "init")}
    lines = [
        "<!-- pretrained_init:start -->",
        "## A student from pretrained weights",
        "",
        f"Command: `{command_line()}`  ",
        f"Machine: {machine()}  ",
        f"Date: {utc_now()}",
        "",
        "Two tasks made from scikit-learn's digits, split in two disjoint halves: a job trains a"
        " cnn_small student to tell which digit (task A, 10 classes, one half) and exports"
        " `model.safetensors`; then the same task-B job (even or odd, the other half,"
        f" {first['train']} training samples, {first['test']} test samples; cnn_large teacher,"
        f" {FINETUNE_EPOCHS} epochs of KD, the no-teacher baseline and `keep: better` as by default) runs twice"
        " per seed: its student from random weights, and from task A's weights"
        ' (`"init": {"source": "safetensors", …}`; '
        f"{info['tensors_loaded']} tensors loaded, head replaced: {info['head_replaced']}, since"
        " task A has 10 classes and task B 2). Accuracy of the model each job hands over, on the"
        " held-out test split, with its 95 % Wilson interval; the gain's interval is a paired"
        " bootstrap over the test samples (both jobs have the same split).",
        "",
        "| seed | from scratch (%) | from task A's weights (%) | gain, 95 % CI (pt) | kept (scratch / init) |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s, i = r["scratch"], r["init"]
        low, high = paired_gain_ci(i["correct"], s["correct"])
        lines.append(
            f"| {r['seed']} | {pt(s['accuracy'])} {ci(s['ci'])} | {pt(i['accuracy'])} {ci(i['ci'])} | "
            f"{(i['accuracy'] - s['accuracy']) * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}] | "
            f"{s['kept']} / {i['kept']} |"
        )
    lines += [
        "",
        f"Target: the pretrained-init student beats the one from scratch (mean over the seeds):"
        f" {pt(mean['init'])} vs {pt(mean['scratch'])}, {(mean['init'] - mean['scratch']) * 100:+.2f} pt"
        f" — **{'PASS' if passed else 'FAIL'}**. Every job's report says which weights a model"
        " started from and whether its head was replaced (`report.init`, and"
        " `init_tensors_loaded` / `init_head_replaced` in the baseline and distill stages' metrics).",
        "<!-- pretrained_init:end -->",
    ]
    return "\n".join(lines)


def run(profile: str, write: Path | None) -> bool:
    args = ["--seeds", *map(str, range(12))] if profile == "full" else []
    return main(args + (["--write", str(write)] if write else [])) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrained_init", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = measure(args.seeds)
    passed = statistics.mean(r["init"]["accuracy"] for r in rows) > statistics.mean(
        r["scratch"]["accuracy"] for r in rows
    )
    text = render(rows, passed)
    print(text)
    if args.write:
        write_section(args.write, "pretrained_init", text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
