"""Distill stage: train the student against the teacher (and, if asked, a no-teacher baseline)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from worker.pipeline.archs import build_model, count_params
from worker.pipeline.context import StageContext
from worker.pipeline.data import DataBundle
from worker.pipeline.init_weights import start_from
from worker.pipeline.losses import CrossEntropyOnly, build_kd_loss
from worker.pipeline.preflight import feature_layer, feature_loss
from worker.pipeline.samples import Samples
from worker.pipeline.spec import DistillSpec, FeatureLossSpec, StudentSpec
from worker.pipeline.teacher import TeacherResult
from worker.pipeline.train import (
    FeatureHook,
    FeatureTerm,
    TrainConfig,
    accuracy,
    fit,
    predict_batches,
)


@dataclass
class TeacherSignal:
    """How the student sees the teacher: precomputed logits, or a call on every batch."""

    logits: torch.Tensor | None
    online: object | None
    seconds: float = 0.0


def teacher_signal(
    teacher: TeacherResult, data: DataBundle, spec: DistillSpec, ctx: StageContext
) -> TeacherSignal:
    """Cache the teacher's logits once when inputs are not augmented.

    The teacher forward is the dominant cost of textbook KD (it runs on every batch of every
    epoch); without augmentation the same input always gives the same logits, so one pass
    over the training split replaces epochs x batches forwards.
    """
    if spec.cache_teacher_logits and not spec.augment and spec.feature is None:
        started = time.perf_counter()
        folder = ctx.checkpoint_dir or Path(tempfile.mkdtemp(prefix="distillery-logits-"))
        logits = cache_logits(teacher.logits_fn, data.x_train, ctx.device, folder)
        return TeacherSignal(logits, None, time.perf_counter() - started)
    return TeacherSignal(None, teacher.logits_fn)


def cache_logits(fn, x: Samples, device: torch.device, folder: Path) -> torch.Tensor:
    """The teacher's logits for `x` written to `folder/teacher_logits.npy` batch by batch and
    handed back memory-mapped: the training loop reads the rows of each batch from the page
    cache, and the job's memory does not hold N x classes floats."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "teacher_logits.npy"
    out = None
    done = 0
    for batch in predict_batches(fn, x, device):
        if out is None:
            shape = (len(x), batch.shape[1])
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        out[done : done + len(batch)] = batch.numpy()
        done += len(batch)
    assert out is not None
    out.flush()
    del out
    # Copy-on-write: the tensor is writable (as torch wants) and the file stays as written.
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def feature_term(
    spec: FeatureLossSpec, student: nn.Module, teacher: nn.Module, data: DataBundle, device
) -> FeatureTerm:
    s_hook = FeatureHook(feature_layer(student, spec.student_layer, "student"))
    t_hook = FeatureHook(feature_layer(teacher, spec.teacher_layer, "teacher"))
    probe = data.x_train[:2].to(device)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        student(probe)
        teacher(probe)
    student.train(was_training)
    loss = feature_loss(spec, s_hook.value, t_hook.value)
    return FeatureTerm(loss.to(device), s_hook, t_hook, spec.weight)


def train_student(
    student_spec: StudentSpec,
    spec: DistillSpec,
    data: DataBundle,
    ctx: StageContext,
    seed: int,
    *,
    signal: TeacherSignal | None,
    teacher: TeacherResult | None = None,
    tag: str = "distill",
    progress_span: tuple[float, float] = (0.0, 1.0),
) -> tuple[nn.Module, dict[str, float]]:
    """Train a student from random weights, or from the spec's `init`; with `signal=None` it
    learns from labels only (the baseline)."""
    torch.manual_seed(seed)
    student = build_model(
        student_spec.arch, data.input_shape, data.num_classes, **student_spec.arch_kwargs
    )
    init = start_from(student, student_spec.init, "student.init")
    student.to(ctx.device)
    cfg = TrainConfig(
        spec.epochs, spec.lr, spec.weight_decay, spec.batch_size, spec.augment, spec.amp, seed
    )
    loss_fn: nn.Module
    features = None
    if signal is None:
        loss_fn = CrossEntropyOnly()
    else:
        loss_fn = build_kd_loss(spec)
        if spec.feature is not None and teacher is not None and teacher.module is not None:
            features = feature_term(spec.feature, student, teacher.module, data, ctx.device)
    try:
        parts = fit(
            student,
            data.x_train,
            data.y_train,
            cfg=cfg,
            loss_fn=loss_fn,
            ctx=ctx,
            teacher=signal.online if signal else None,
            teacher_logits=signal.logits if signal else None,
            features=features,
            progress_span=progress_span,
            tag=tag,
            val=data.val,
        )
    finally:
        if features is not None:
            features.student.remove()
            features.teacher.remove()
    metrics = {f"train_{k}" if not k.startswith("train") else k: v for k, v in parts.items()}
    metrics["torch_accuracy"] = accuracy(student, data.x_test, data.y_test, ctx.device)
    metrics["params"] = count_params(student)
    metrics.update(init)
    return student, metrics


def finetune(
    model: nn.Module,
    data: DataBundle,
    distill: DistillSpec,
    signal: TeacherSignal,
    ctx: StageContext,
    *,
    lr: float,
    epochs: int,
    seed: int,
    span: tuple[float, float] = (0.0, 1.0),
    tag: str,
    amp: bool | None = None,
) -> dict[str, float]:
    """Fine-tune `model` in place against the teacher with the job's KD loss and the
    distillation's batch size, weight decay and augmentation, at rate `lr` (the prune stage's
    fine-tune, quantization-aware distillation); `amp` overrides `distill.amp`."""
    amp = distill.amp if amp is None else amp
    cfg = TrainConfig(
        epochs, lr, distill.weight_decay, distill.batch_size, distill.augment, amp, seed
    )
    return fit(
        model,
        data.x_train,
        data.y_train,
        cfg=cfg,
        loss_fn=build_kd_loss(distill),
        ctx=ctx,
        teacher=signal.online,  # type: ignore[arg-type]
        teacher_logits=signal.logits,
        progress_span=span,
        tag=tag,
        val=data.val,
    )


def run(
    teacher: TeacherResult,
    data: DataBundle,
    spec: DistillSpec,
    student_spec: StudentSpec,
    ctx: StageContext,
    seed: int,
    signal: TeacherSignal | None = None,
) -> tuple[nn.Module, dict[str, float], TeacherSignal]:
    """Distill a student; returns it, its metrics and the teacher signal (reused by pruning)."""
    signal = signal or teacher_signal(teacher, data, spec, ctx)
    student, metrics = train_student(
        student_spec, spec, data, ctx, seed, signal=signal, teacher=teacher, tag="distill"
    )
    metrics["teacher_logits_cached"] = float(signal.logits is not None)
    metrics["teacher_cache_seconds"] = signal.seconds
    return student, metrics, signal
