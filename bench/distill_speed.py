"""Distill stage vs a hand-written textbook KD loop: same models, data, epochs, loss, schedule.

    python -m bench.distill_speed [--repeats N] [--epochs E] [--write docs/BENCHMARKS.md]

A cnn_large teacher is trained once on the builtin digits with the pipeline's teacher stage
(not timed) and shared by every contender. Each contender then distills a fresh cnn_small:

  hand loop         DataLoader + `with torch.no_grad(): teacher(x)` on every batch (textbook)
  pipeline          worker.pipeline.distill.run with cache_teacher_logits=True (the default);
                    the timed call includes caching the teacher logits and the test accuracy
  pipeline, online  the same with cache_teacher_logits=False (teacher called on every batch)

Repeat r uses seed r for the student's init and batch order in all three contenders, so the
accuracies compare like with like and their mean over repeats is less noisy than one seed run
again (on the CPU a repeated seed gives the same accuracy, so it would only re-measure time).
Runs alternate a, b, c, a, b, c, ... so drift in machine speed hits all three alike; the
reported time is the median.

Torch runs on one thread unless --threads says otherwise: on a small shared VM, OpenMP
threads that spin-wait for a preempted sibling turn 0.3 s epochs into 4-9 s ones at random
(measured on a 2-vCPU host), which no median of three survives. `--threads 0` keeps
torch's default.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from worker.pipeline import distill, teacher
from worker.pipeline.archs import build_model
from worker.pipeline.context import StageContext
from worker.pipeline.data import DataBundle, load_dataset
from worker.pipeline.losses import HintonKD
from worker.pipeline.spec import BuiltinDataset, DistillSpec, StudentSpec, TrainedTeacher
from worker.pipeline.train import accuracy

START, END = "<!-- distill_speed:start -->", "<!-- distill_speed:end -->"
TARGET_RATIO = 0.5  # the pipeline's distill stage at most half the hand loop's time
TARGET_ACC_PT = 0.5  # at equal accuracy, within this many percentage points
STUDENT = "cnn_small"
DATA_SEED = 0  # data split and teacher are fixed; only the student's seed varies per repeat

DOC_INTRO = (
    "Measured numbers for Distillery, each with the command that produced it and the machine "
    "it ran on. Sections between `<!-- name:start -->` and `<!-- name:end -->` markers are "
    "rewritten by the benchmark of that name (`python -m bench.<name> --write "
    "docs/BENCHMARKS.md`); edit the text outside them by hand."
)


def hand_written_kd(
    teacher_model: nn.Module, data: DataBundle, spec: DistillSpec, seed: int, device: torch.device
) -> nn.Module:
    """Textbook knowledge distillation: the teacher runs on every batch of every epoch.

    Same student init (seed before build_model), optimizer, one-cycle schedule stepped per
    batch, and loss as the pipeline's distill stage; only the loop itself is plain PyTorch.
    """
    torch.manual_seed(seed)
    student = build_model(STUDENT, data.input_shape, data.num_classes).to(device)
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=spec.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    criterion = HintonKD(temperature=spec.temperature, alpha=spec.alpha)
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.lr, total_steps=spec.epochs * len(loader), pct_start=0.15
    )
    teacher_model.to(device).eval()
    student.train()
    for _epoch in range(spec.epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                t = teacher_model(x)
            s = student(x)
            loss = criterion(s, t, y)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    student.eval()
    return student


@dataclass
class Contender:
    name: str
    train: Callable[[int], nn.Module]  # seed -> trained student (the timed part)
    seconds: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)  # one per repeat, seed = repeat

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean_acc(self) -> float:
        return statistics.fmean(self.accuracies)


def contenders(
    result: teacher.TeacherResult, data: DataBundle, spec: DistillSpec, ctx: StageContext
) -> list[Contender]:
    assert result.module is not None  # a trained teacher is a torch module
    module = result.module

    def pipeline(cache: bool) -> Callable[[int], nn.Module]:
        stage_spec = spec.model_copy(update={"cache_teacher_logits": cache})

        def train(seed: int) -> nn.Module:
            student, _, _ = distill.run(
                result, data, stage_spec, StudentSpec(arch=STUDENT), ctx, seed
            )
            return student

        return train

    return [
        Contender("hand loop", lambda seed: hand_written_kd(module, data, spec, seed, ctx.device)),
        Contender("pipeline", pipeline(cache=True)),
        Contender("pipeline, online", pipeline(cache=False)),
    ]


def measure(runs: list[Contender], data: DataBundle, repeats: int, device: torch.device) -> None:
    for seed in range(repeats):
        for c in runs:
            started = time.perf_counter()
            student = c.train(seed)
            c.seconds.append(time.perf_counter() - started)
            c.accuracies.append(accuracy(student, data.x_test, data.y_test, device))
            print(
                f"  repeat {seed + 1}/{repeats} {c.name:<17} {c.seconds[-1]:7.2f} s  "
                f"acc {100 * c.accuracies[-1]:.2f}%",
                flush=True,
            )


def table(runs: list[Contender]) -> str:
    base = runs[0]
    seeds = " / ".join(f"seed {i}" for i in range(len(base.accuracies)))
    lines = [
        f"| contender | median time (s) | time / hand loop | accuracy, mean (%) | accuracy ({seeds}) |",
        "|---|---:|---:|---:|---|",
    ]
    for c in runs:
        per_seed = " / ".join(f"{100 * a:.2f}" for a in c.accuracies)
        lines.append(
            f"| {c.name} | {c.median_s:.2f} | {c.median_s / base.median_s:.2f}x "
            f"| {100 * c.mean_acc:.2f} | {per_seed} |"
        )
    return "\n".join(lines)


def verdict(runs: list[Contender]) -> tuple[bool, str]:
    hand, pipe = runs[0], runs[1]
    ratio = pipe.median_s / hand.median_s
    gap = 100 * (pipe.mean_acc - hand.mean_acc)
    ok = ratio <= TARGET_RATIO and abs(gap) <= TARGET_ACC_PT
    return ok, (
        f"Target: pipeline time / hand-loop time <= {TARGET_RATIO} at equal accuracy "
        f"(±{TARGET_ACC_PT} pt). Measured: {ratio:.2f}x, accuracy gap {gap:+.2f} pt -> "
        f"**{'PASS' if ok else 'FAIL'}**"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    env = [
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ
    ]
    return ", ".join(
        [
            platform.platform(),
            f"CPU {cpu_model()}",
            f"nproc {os.cpu_count()}",
            f"torch {torch.__version__}",
            f"{torch.get_num_threads()} torch thread(s)",
            *env,
        ]
    )


def section(command: str, setup: str, runs: list[Contender]) -> str:
    _, line = verdict(runs)
    return "\n".join(
        [
            START,
            "## Distill stage vs a hand-written KD loop",
            "",
            "The pipeline's distill stage (teacher logits cached once) against a plain PyTorch "
            "KD loop that runs the teacher on every batch, as the textbook writes it; same "
            "teacher, student init, data, epochs, loss, optimizer and schedule. "
            "`pipeline, online` is the distill stage with `cache_teacher_logits: false`, for "
            "reference. Time is wall time of the whole stage call (the pipeline's includes "
            "caching the logits and its own test-accuracy pass); accuracy is on the held-out "
            "split. Both pipeline rows see the same batches for a seed; the hand loop's "
            "DataLoader draws from the same seeded generator but in a different order, so its "
            "per-seed accuracies may differ by a test sample or two.",
            "",
            f"- Command: `{command}`",
            f"- Machine: {machine()}",
            f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Setup: {setup}",
            "",
            table(runs),
            "",
            line,
            END,
        ]
    )


def write_doc(path: Path, body: str) -> None:
    """Replace this benchmark's marked section in `path`, keeping everything else."""
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{DOC_INTRO}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + body + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.distill_speed", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender (seeds 0..N-1)")
    parser.add_argument("--epochs", type=int, default=30, help="student distillation epochs")
    parser.add_argument("--teacher-epochs", type=int, default=15, help="teacher training epochs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--write", type=Path, help="(re)write the result section in this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.epochs < 1 or args.threads < 0:
        parser.error("--repeats and --epochs must be at least 1, --threads at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    ctx = StageContext(device=torch.device("cpu"))
    data = load_dataset(BuiltinDataset(), DATA_SEED)
    started = time.perf_counter()
    result = teacher.run(
        TrainedTeacher(arch="cnn_large", epochs=args.teacher_epochs), data, ctx, DATA_SEED
    )
    teacher_acc = result.metrics["torch_accuracy"]
    print(
        f"teacher cnn_large: {args.teacher_epochs} epochs, {time.perf_counter() - started:.1f} s, "
        f"acc {100 * teacher_acc:.2f}% (not timed below)"
    )
    spec = DistillSpec(epochs=args.epochs)  # batch 64, lr 3e-3, wd 5e-4, kd T=4 alpha=0.9
    setup = (
        f"builtin digits ({len(data.x_train)} train / {len(data.x_test)} test), "
        f"teacher cnn_large trained {args.teacher_epochs} epochs (acc {100 * teacher_acc:.2f}%), "
        f"student {STUDENT}, {spec.epochs} epochs, batch {spec.batch_size}, AdamW lr {spec.lr} "
        f"wd {spec.weight_decay}, one-cycle, KD T={spec.temperature} alpha={spec.alpha}, "
        f"{args.repeats} repeats (seeds 0..{args.repeats - 1}), median time; "
        f"one test sample is {100 / len(data.x_test):.2f} pt of accuracy"
    )

    # One untimed epoch of each first: one-off costs (allocator, kernel selection) stay out.
    warm = spec.model_copy(update={"epochs": 1})
    for c in contenders(result, data, warm, ctx):
        c.train(0)
    runs = contenders(result, data, spec, ctx)
    measure(runs, data, args.repeats, ctx.device)

    print()
    print(table(runs))
    ok, line = verdict(runs)
    print(line.replace("**", ""))
    if args.write is not None:
        argv_shown = sys.argv[1:] if argv is None else argv
        command = shlex.join(["python", "-m", "bench.distill_speed", *argv_shown])
        write_doc(args.write, section(command, setup, runs))
        print(f"wrote {args.write}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
