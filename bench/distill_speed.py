"""Distillation speed: our distill stage against a hand-written KD loop and torchdistill, on
the same teacher, student init, data, epochs, batch size, loss, optimizer and schedule.

    python -m bench.distill_speed [--full] [--repeats N] [--epochs E] [--write docs/BENCHMARKS.md]

A cnn_large teacher is trained once on the builtin digits with the pipeline's teacher stage
(not timed) and shared by every contender. Each contender then distills a fresh cnn_small:

  (a) hand loop     DataLoader + `with torch.no_grad(): teacher(x)` on every batch (textbook)
  (b) torchdistill  its DistillationBox, built by get_distillation_box from its own YAML train
                    config (TORCHDISTILL_CONFIG below, loaded with its yaml_util) and driven by
                    the loop of its examples/torchvision/image_classification.py; its KDLoss
  (c) cached        worker.pipeline.distill.run with cache_teacher_logits=True (the default);
                    the timed call includes caching the teacher logits and the test accuracy
  (c) online        the same with cache_teacher_logits=False (teacher called on every batch)

Repeat r uses seed r for the student's init and batch order in every contender (each loop
draws its orders from that seed its own way, so the orders differ), so the accuracies compare
like with like and their mean over repeats is less noisy than one seed run
again (on the CPU a repeated seed gives the same accuracy, so it would only re-measure time).
Runs alternate a, b, c, c, a, b, ... so drift in machine speed hits all of them alike; the
reported time is the median, and every ratio is between medians of this one process run.

Torch runs on one thread unless --threads says otherwise: on a small shared VM, OpenMP
threads that spin-wait for a preempted sibling turn 0.3 s epochs into 4-9 s ones at random
(measured on a 2-vCPU host), which no median of three survives. `--threads 0` keeps
torch's default.

Profiles (`python -m bench` passes one): default = CPU, 3 repeats; full = device auto (the
GPU where there is one), 5 repeats. Mixed precision is off in every contender, so the GPU
does the same fp32 work for all of them.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# DOC_INTRO and cpu_model are re-exported: other benchmarks import them from here.
from bench.common import (  # noqa: F401
    DOC_INTRO,
    command_line,
    cpu_model,
    machine,
    markers,
    utc_now,
    write_section,
)
from worker.pipeline import distill, teacher
from worker.pipeline.archs import build_model
from worker.pipeline.context import StageContext, resolve_device
from worker.pipeline.data import DataBundle, load_dataset
from worker.pipeline.losses import HintonKD
from worker.pipeline.spec import BuiltinDataset, DistillSpec, StudentSpec, TrainedTeacher
from worker.pipeline.train import accuracy

NAME = "distill_speed"
START, END = markers(NAME)
TARGET_CACHED = 0.5  # the distill stage with cached logits: at most half of (a) and of (b)
TARGET_ONLINE = 1.05  # without caching: at most 5% slower than the hand loop
TARGET_ACC_PT = 0.5  # every contender's mean accuracy within this many points of (a)'s
STUDENT = "cnn_small"
DATA_SEED = 0  # data split and teacher are fixed; only the student's seed varies per repeat


@dataclass(frozen=True)
class Settings:
    repeats: int = 3
    epochs: int = 30  # student distillation epochs
    teacher_epochs: int = 15
    threads: int = 1  # torch intra-op threads; 0 keeps torch's default
    device: str = "cpu"


PROFILE_SETTINGS = {
    "default": Settings(),
    "full": Settings(repeats=5, device="auto"),
}

# torchdistill's own train config, in the YAML form of its configs/sample/*/kd/*.yaml and
# loaded by its yaml_util, so its tags (!import_get, !import_call, !call_method) do what they
# do there. Its KDLoss weighs the *hard* loss by alpha and the soft one by beta:
#   alpha * CE + beta * T^2 * KL,
# so our alpha (the KD weight) is its beta, and its alpha is 1 - ours.
TORCHDISTILL_CONFIG = """\
train:
  num_epochs: {epochs}
  train_data_loader:
    dataset_id: 'digits/train'
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.RandomSampler'
      kwargs:
        generator: !call_method
          obj: !import_call
            key: 'torch.Generator'
          method_name: 'manual_seed'
          args: [{seed}]
    kwargs:
      batch_size: {batch_size}
      num_workers: 0
      drop_last: False
  teacher:
    forward_proc: 'forward_batch_only'
    sequential: []
    requires_grad: False
    frozen_modules: []
  student:
    forward_proc: 'forward_batch_only'
    sequential: []
    requires_grad: True
    frozen_modules: []
  optimizer:
    key: 'AdamW'
    kwargs:
      lr: {lr}
      weight_decay: {weight_decay}
  scheduler:
    key: 'OneCycleLR'
    kwargs:
      max_lr: {lr}
      total_steps: {total_steps}
      pct_start: 0.15
    scheduling_step: 1
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        kd:
          criterion:
            key: 'KDLoss'
            kwargs:
              student_module_path: '.'
              student_module_io: 'output'
              teacher_module_path: '.'
              teacher_module_io: 'output'
              temperature: {temperature}
              alpha: {hard_weight}
              beta: {soft_weight}
              reduction: 'batchmean'
          weight: 1.0
"""


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


def torchdistill_config(spec: DistillSpec, steps_per_epoch: int, seed: int) -> dict:
    """TORCHDISTILL_CONFIG filled in from `spec` and loaded the way torchdistill loads its
    configs (yaml_util.load_yaml_file, with its constructors)."""
    from torchdistill.common import yaml_util

    text = TORCHDISTILL_CONFIG.format(
        epochs=spec.epochs,
        seed=seed,
        batch_size=spec.batch_size,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        total_steps=spec.epochs * steps_per_epoch,
        temperature=spec.temperature,
        hard_weight=1.0 - spec.alpha,
        soft_weight=spec.alpha,
    )
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return yaml_util.load_yaml_file(f.name)


def torchdistill_kd(
    teacher_model: nn.Module, data: DataBundle, spec: DistillSpec, seed: int, device: torch.device
) -> nn.Module:
    """torchdistill's single-stage DistillationBox over the same TensorDataset, models passed in
    as objects (as its example script does after building them), trained by the loop of its
    examples/torchvision/image_classification.py (minus logging and per-epoch validation)."""
    from torchdistill.core.distillation import get_distillation_box

    steps_per_epoch = -(-len(data.x_train) // spec.batch_size)
    config = torchdistill_config(spec, steps_per_epoch, seed)
    torch.manual_seed(seed)
    student = build_model(STUDENT, data.input_shape, data.num_classes).to(device)
    teacher_model.to(device).eval()
    datasets = {"digits/train": TensorDataset(data.x_train, data.y_train)}
    box = get_distillation_box(
        teacher_model, student, datasets, config["train"], device, None, False, 1
    )
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            if not torch.isfinite(loss):
                raise ValueError(f"torchdistill: loss became {loss.item()}")
        box.post_epoch_process()
    box.clean_modules()  # removes its hooks and unfreezes the shared teacher
    student.eval()
    return student


@dataclass
class Contender:
    key: str
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
        Contender(
            "a",
            "(a) hand loop",
            lambda seed: hand_written_kd(module, data, spec, seed, ctx.device),
        ),
        Contender(
            "b",
            "(b) torchdistill",
            lambda seed: torchdistill_kd(module, data, spec, seed, ctx.device),
        ),
        Contender("c", "(c) distill stage, cached", pipeline(cache=True)),
        Contender("c_online", "(c) distill stage, online", pipeline(cache=False)),
    ]


def measure(runs: list[Contender], data: DataBundle, repeats: int, device: torch.device) -> None:
    for seed in range(repeats):
        for c in runs:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            student = c.train(seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            c.seconds.append(time.perf_counter() - started)
            c.accuracies.append(accuracy(student, data.x_test, data.y_test, device))
            print(
                f"  repeat {seed + 1}/{repeats} {c.name:<27} {c.seconds[-1]:7.2f} s  "
                f"acc {100 * c.accuracies[-1]:.2f}%",
                flush=True,
            )


@dataclass
class StepCosts:
    teacher_ms: float  # teacher forward on one batch, no_grad
    student_ms: float  # student forward + KD loss + backward + AdamW step on one batch

    @property
    def floor(self) -> float:
        """The least a KD step can cost with the teacher's forward cached, as a share of the
        step with it: what caching alone can do for (c) against a teacher-every-batch loop."""
        return self.student_ms / (self.teacher_ms + self.student_ms)

    def line(self) -> str:
        return (
            f"Where a KD step's time goes (median of 5 blocks of 50 batches, after warm-up): "
            f"teacher forward {self.teacher_ms:.2f} ms, student forward + loss + backward + "
            f"AdamW step {self.student_ms:.2f} ms per batch of the training data. Caching the "
            f"teacher's logits removes the first, so a step can at best take "
            f"{self.floor:.2f}x the time of one that runs the teacher."
        )


def step_costs(
    teacher_model: nn.Module, data: DataBundle, spec: DistillSpec, device: torch.device
) -> StepCosts:
    """Time the two halves of a KD step on the contenders' batches (a fresh student, whose
    updates are thrown away), to explain the ratios: caching can only remove the first."""
    torch.manual_seed(0)
    student = build_model(STUDENT, data.input_shape, data.num_classes).to(device).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    criterion = HintonKD(temperature=spec.temperature, alpha=spec.alpha)
    teacher_model.to(device).eval()
    x, y = data.x_train.to(device), data.y_train.to(device)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).to(device)
    batches = [order[i : i + spec.batch_size] for i in range(0, len(x), spec.batch_size)]
    batches = [b for b in batches if len(b) == spec.batch_size]
    with torch.no_grad():
        logits = teacher_model(x)

    def teacher_step(b: torch.Tensor) -> None:
        with torch.no_grad():
            teacher_model(x[b])

    def student_step(b: torch.Tensor) -> None:
        loss = criterion(student(x[b]), logits[b], y[b])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def per_batch_ms(fn: Callable[[torch.Tensor], None]) -> float:
        for i in range(10):
            fn(batches[i % len(batches)])
        blocks = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for i in range(50):
                fn(batches[i % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            blocks.append(1000 * (time.perf_counter() - started) / 50)
        return statistics.median(blocks)

    return StepCosts(per_batch_ms(teacher_step), per_batch_ms(student_step))


def by_key(runs: list[Contender]) -> dict[str, Contender]:
    return {c.key: c for c in runs}


def table(runs: list[Contender], epochs: int) -> str:
    k = by_key(runs)
    a, b = k["a"], k["b"]
    seeds = " / ".join(f"seed {i}" for i in range(len(a.accuracies)))
    lines = [
        "| contender | per epoch, median (ms) | whole call, median (s) | vs (a) | vs (b) "
        f"| accuracy, mean (%) | accuracy ({seeds}) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in runs:
        per_seed = " / ".join(f"{100 * acc:.2f}" for acc in c.accuracies)
        lines.append(
            f"| {c.name} | {1000 * c.median_s / epochs:.1f} | {c.median_s:.2f} "
            f"| {c.median_s / a.median_s:.2f}x | {c.median_s / b.median_s:.2f}x "
            f"| {100 * c.mean_acc:.2f} | {per_seed} |"
        )
    return "\n".join(lines)


def verdict(runs: list[Contender]) -> tuple[bool, list[str]]:
    k = by_key(runs)
    a, b, c, online = k["a"], k["b"], k["c"], k["c_online"]
    checks = [
        ("(c) cached / (a)", c.median_s / a.median_s, TARGET_CACHED),
        ("(c) cached / (b)", c.median_s / b.median_s, TARGET_CACHED),
        ("(c) online / (a)", online.median_s / a.median_s, TARGET_ONLINE),
    ]
    lines = []
    ok = True
    for label, ratio, limit in checks:
        passed = ratio <= limit
        ok &= passed
        lines.append(f"{label} <= {limit}x: {ratio:.2f}x **{'PASS' if passed else 'FAIL'}**")
    gaps = {x.name: 100 * (x.mean_acc - a.mean_acc) for x in (b, c, online)}
    acc_ok = all(abs(g) <= TARGET_ACC_PT for g in gaps.values())
    ok &= acc_ok
    shown = ", ".join(f"{name} {g:+.2f} pt" for name, g in gaps.items())
    lines.append(
        f"mean accuracy within ±{TARGET_ACC_PT} pt of (a): {shown} "
        f"**{'PASS' if acc_ok else 'FAIL'}**"
    )
    return ok, lines


def section(
    command: str, setup: str, runs: list[Contender], epochs: int, where: str, costs: StepCosts
) -> str:
    ok, lines = verdict(runs)
    return "\n".join(
        [
            START,
            "## Distillation speed: the distill stage vs a hand-written loop and torchdistill",
            "",
            "Same teacher (trained once, not timed), student init, data, epochs, batch size, "
            "AdamW + per-step one-cycle schedule and Hinton KD loss for every contender. "
            "**(a)** a plain PyTorch KD loop that runs the teacher on every batch, as the "
            "textbook writes it. **(b)** torchdistill's `DistillationBox`, built by "
            "`get_distillation_box` from its own YAML train config (`TORCHDISTILL_CONFIG` in "
            "`bench/distill_speed.py`: its `RandomSampler` with a seeded generator, `AdamW`, "
            "`OneCycleLR` with `scheduling_step: 1`, `WeightedSumLoss` over its `KDLoss`) and "
            "run by the loop of its image-classification example; it too runs the teacher on "
            "every batch (torchdistill, as of 1.1.5, keeps no cache of teacher outputs). Its `KDLoss` weighs "
            "the hard loss by `alpha` and the soft one by `beta`, so it gets `alpha = 1 - "
            "ours`, `beta = ours`: the same loss value (checked to float rounding). **(c)** "
            "the pipeline's distill stage, with teacher logits cached once (the default) and "
            "with `cache_teacher_logits: false`.",
            "",
            "Time is the wall time of the whole call, divided by the epochs for the per-epoch "
            "column: model and optimizer set-up included everywhere, and for (c) also caching "
            "the logits and its own test-accuracy pass. Ratios are between medians of this "
            "one run. Accuracy is on the held-out split. Every contender draws its batch order "
            "from a generator seeded with the repeat's seed, but each consumes it its own way "
            "(the hand loop's DataLoader, torchdistill's RandomSampler, the stage's randperm), "
            "so they see different orders and per-seed accuracies may differ by a test sample "
            "or two: compare the means.",
            "",
            f"- Command: `{command}`",
            f"- Machine: {where}",
            f"- Date: {utc_now()}",
            f"- Setup: {setup}",
            "",
            table(runs, epochs),
            "",
            "Targets: (c) cached at most "
            f"{TARGET_CACHED}x (a) and (b), (c) online at most {TARGET_ONLINE}x (a), "
            "accuracy equal within noise. Measured:",
            "",
            *[f"- {line}" for line in lines],
            "",
            f"Overall: **{'PASS' if ok else 'FAIL'}**",
            "",
            costs.line(),
            END,
        ]
    )


def bench(settings: Settings, write: Path | None, command: str) -> bool:
    """Measure with `settings`, print the table and verdict, write the section; True on PASS."""
    try:
        import torchdistill
    except ImportError as e:
        raise RuntimeError(
            "distill_speed needs torchdistill: .venv/bin/pip install -e '.[bench]'"
        ) from e
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    ctx = StageContext(device=device)
    data = load_dataset(BuiltinDataset(), DATA_SEED)
    started = time.perf_counter()
    result = teacher.run(
        TrainedTeacher(arch="cnn_large", epochs=settings.teacher_epochs), data, ctx, DATA_SEED
    )
    teacher_acc = result.metrics["torch_accuracy"]
    print(
        f"teacher cnn_large: {settings.teacher_epochs} epochs, "
        f"{time.perf_counter() - started:.1f} s, acc {100 * teacher_acc:.2f}% (not timed below)"
    )
    # batch 64, lr 3e-3, wd 5e-4, kd T=4 alpha=0.9; fp32 everywhere, like (a) and (b)
    spec = DistillSpec(epochs=settings.epochs, amp=False)
    setup = (
        f"builtin digits ({len(data.x_train)} train / {len(data.x_test)} test), device "
        f"{device.type}, teacher cnn_large trained {settings.teacher_epochs} epochs "
        f"(acc {100 * teacher_acc:.2f}%), student {STUDENT}, {spec.epochs} epochs, batch "
        f"{spec.batch_size}, AdamW lr {spec.lr} wd {spec.weight_decay}, one-cycle "
        f"(pct_start 0.15, stepped per batch), KD T={spec.temperature} alpha={spec.alpha}, "
        f"torchdistill {torchdistill.__version__}, {settings.repeats} repeats (seeds "
        f"0..{settings.repeats - 1}), median time; one test sample is "
        f"{100 / len(data.x_test):.2f} pt of accuracy"
    )

    # One untimed epoch of each first: one-off costs (allocator, kernel selection) stay out.
    warm = spec.model_copy(update={"epochs": 1})
    for c in contenders(result, data, warm, ctx):
        c.train(0)
    runs = contenders(result, data, spec, ctx)
    measure(runs, data, settings.repeats, device)

    assert result.module is not None
    costs = step_costs(result.module, data, spec, device)

    print()
    print(table(runs, spec.epochs))
    ok, lines = verdict(runs)
    for line in lines:
        print(line.replace("**", ""))
    print(costs.line())
    if write is not None:
        body = section(command, setup, runs, spec.epochs, machine(device), costs)
        write_section(write, NAME, body)
        print(f"wrote {write}")
    return ok


def run(profile: str, write: Path | None) -> bool:
    """Entry point for `python -m bench` (see bench/README.md): True when every target is met."""
    return bench(PROFILE_SETTINGS[profile], write, command_line())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.distill_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--full", action="store_true", help="the GPU-host profile's settings")
    parser.add_argument("--repeats", type=int, help="runs per contender (seeds 0..N-1; 3, full 5)")
    parser.add_argument("--epochs", type=int, help="student distillation epochs (30)")
    parser.add_argument("--teacher-epochs", type=int, help="teacher training epochs (15)")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (1; 0: torch's default)"
    )
    parser.add_argument("--device", help="cpu, cuda or auto (default cpu, full auto)")
    parser.add_argument("--write", type=Path, help="(re)write the result section in this file")
    args = parser.parse_args(argv)
    settings = PROFILE_SETTINGS["full" if args.full else "default"]
    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__ and v is not None
    }
    settings = replace(settings, **overrides)
    if settings.repeats < 1 or settings.epochs < 1 or settings.threads < 0:
        parser.error("--repeats and --epochs must be at least 1, --threads at least 0")
    command = (
        command_line()
        if argv is None
        else shlex.join(["python", "-m", "bench.distill_speed", *argv])
    )
    return 0 if bench(settings, args.write, command) else 1


if __name__ == "__main__":
    sys.exit(main())
