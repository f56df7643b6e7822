"""One small training loop shared by the teacher, distill and prune fine-tune stages.

Batches are index slices of a seeded permutation (bit-for-bit resumable). A small dataset
lives as tensors on the device and is sliced there; a large one is a `samples.Split`, whose
batches DataLoader workers read from disk ahead of the loop (pinned, copied without blocking
on CUDA) in the same order, so both give the same batches.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from worker.pipeline.augment import augment, batch_seed, pipeline_for
from worker.pipeline.context import StageContext
from worker.pipeline.errors import NanLoss
from worker.pipeline.samples import (
    DataSettings,
    Samples,
    Split,
    batch_size_for,
    batches,
    to_device,
    traced,
    training_loader,
    wants_channels_last,
)

# A teacher is anything that maps an input batch to logits: a torch module, or an ONNX
# Runtime session wrapped by the teacher stage.
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    augment: bool = False
    amp: bool = True
    seed: int = 0


@dataclass
class FeatureHook:
    """Captures one module's output on every forward."""

    module: nn.Module
    value: torch.Tensor | None = None
    handle: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.handle = self.module.register_forward_hook(self._store)

    def _store(self, _m, _inp, out) -> None:
        self.value = out

    def remove(self) -> None:
        self.handle.remove()  # type: ignore[attr-defined]


@dataclass
class FeatureTerm:
    """A feature loss between a student layer and a teacher layer (teacher run online)."""

    loss: nn.Module
    student: FeatureHook
    teacher: FeatureHook
    weight: float


@torch.no_grad()
def predict_batches(
    fn: LogitsFn | nn.Module,
    x: Samples,
    device: torch.device,
    batch_size: int | None = None,
    settings: DataSettings | None = None,
) -> Iterator[torch.Tensor]:
    """Logits for `x` in eval mode, a batch at a time, on the CPU as float32. The batch size,
    unless given, is what the memory budget holds at the model's activation bytes per sample
    (a 224-px ResNet gets a few dozen images a batch, a tiny MLP a thousand)."""
    was_training = isinstance(fn, nn.Module) and fn.training
    if isinstance(fn, nn.Module):
        fn.eval()
    try:
        start = 0
        if batch_size is None:
            # The first sample, traced, sizes the batches of the rest.
            out, per_sample = traced(fn, to_device(x[:1], device))
            yield out.float().cpu()
            settings = settings or (x.settings if isinstance(x, Split) else DataSettings())
            batch_size = batch_size_for(per_sample, settings.budget(device), len(x))
            start = 1
        for xb in batches(x, batch_size, start):
            yield fn(to_device(xb, device)).float().cpu()
    finally:
        if was_training:
            fn.train()  # type: ignore[union-attr]


def predict_logits(
    fn: LogitsFn | nn.Module,
    x: Samples,
    device: torch.device,
    batch_size: int | None = None,
    settings: DataSettings | None = None,
) -> torch.Tensor:
    """Logits for `x` in eval mode (see `predict_batches`), as one CPU tensor."""
    return torch.cat(list(predict_batches(fn, x, device, batch_size, settings)))


def accuracy(fn: LogitsFn | nn.Module, x: Samples, y: torch.Tensor, device: torch.device) -> float:
    return (predict_logits(fn, x, device).argmax(1) == y.cpu()).float().mean().item()


def _amp_context(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype), dtype
    return contextlib.nullcontext(), None


def _save_atomic(state: dict, path) -> None:
    """Write then rename: a process killed mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


SYNC_EVERY = 32  # batches between reads of the loss (and checks that it is finite)


class _LossLog:
    """One epoch's loss parts, kept on the device and read in blocks of SYNC_EVERY batches.

    A non-finite loss is still reported with the batch it first appeared in; the batches after
    it in the same block have run by then, and the stage fails before its checkpoint is saved."""

    def __init__(self, tag: str, epoch: int) -> None:
        self.tag, self.epoch = tag, epoch
        self.names: list[str] = []  # "loss" first: column 0 is the one checked
        self.batches: list[int] = []
        self.rows: list[torch.Tensor] = []
        self.sums = torch.zeros(0)
        self.count = 0

    def add(self, batch: int, parts: dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = ["loss", *(k for k in parts if k != "loss")]
        self.batches.append(batch)
        self.rows.append(torch.stack([parts[k].detach().float() for k in self.names]))
        if len(self.rows) >= SYNC_EVERY:
            self._read()

    def _read(self) -> None:
        if not self.rows:
            return
        block = torch.stack(self.rows).cpu()  # the one wait per block
        bad = (~torch.isfinite(block[:, 0])).nonzero()
        if len(bad):
            first = int(bad[0])
            raise NanLoss(
                f"{self.tag}: loss became {block[first, 0].item()} at epoch {self.epoch + 1}, "
                f"batch {self.batches[first] + 1}; lower the learning rate or check the data"
            )
        self.sums = block.sum(0) + (self.sums if self.count else 0)
        self.count += len(self.rows)
        self.batches.clear()
        self.rows.clear()

    def means(self) -> dict[str, float]:
        self._read()
        if not self.count:
            return {}
        return {k: float(v) / self.count for k, v in zip(self.names, self.sums, strict=True)}


def _epoch_row(
    tag: str,
    epoch: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    parts: dict[str, float],
    model: nn.Module,
    val: tuple[Samples, torch.Tensor] | None,
    seconds: float,
    device: torch.device,
) -> dict[str, float | int | str | None]:
    """One row of the training history (worker.pipeline.history.HISTORY_COLUMNS, less stage)."""
    return {
        "run": tag,
        "epoch": epoch + 1,
        "step": scheduler.last_epoch,  # the scheduler steps once per optimizer step
        "lr": scheduler.get_last_lr()[0],
        "loss": parts.get("loss"),
        "task_loss": parts.get("task_loss"),
        "kd_loss": parts.get("kd_loss"),
        "feature_loss": parts.get("feature_loss"),
        "val_accuracy": None if val is None else accuracy(model, val[0], val[1], device),
        "seconds": seconds,
    }


class _Training:
    """What one training run carries from batch to batch and across a crash: the optimizer,
    its schedule, mixed precision, the seeded shuffling, and the checkpoint they all go to."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        features: FeatureTerm | None,
        cfg: TrainConfig,
        ctx: StageContext,
        n: int,
        tag: str,
    ) -> None:
        device = ctx.device
        self.model, self.loss_fn, self.features, self.cfg = model, loss_fn, features, cfg
        model.to(device).train()
        loss_fn.to(device)
        params = list(model.parameters()) + list(loss_fn.parameters())
        if features is not None:
            params += list(features.loss.parameters())
            features.loss.to(device)
        # The fused kernel updates every parameter in one launch on CUDA (PyTorch's own
        # advice for GPU training); the CPU keeps the default implementation.
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            fused=True if device.type == "cuda" else None,
        )
        self.steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=cfg.lr,
            total_steps=max(1, cfg.epochs * self.steps_per_epoch),
            pct_start=0.15,
        )
        self.autocast, amp_dtype = _amp_context(device, cfg.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        # Augmentation needs no generator of its own: each batch's is seeded from
        # (seed, epoch, batch), so the order's is the only random state a resume restores.
        self.order_g = torch.Generator().manual_seed(cfg.seed)
        self.ckpt = ctx.checkpoint_dir / f"{tag}.pt" if ctx.checkpoint_dir is not None else None

    def teacher_logits(self, teacher: LogitsFn | None, xb: torch.Tensor) -> torch.Tensor | None:
        """The teacher on this batch (online KD), or None when training on labels alone."""
        if teacher is None:
            return None
        with torch.no_grad(), self.autocast:
            return teacher(xb)

    def step(self, xb: torch.Tensor, yb: torch.Tensor, tb: torch.Tensor | None) -> dict:
        """One optimizer step; the loss parts stay on the device (see _LossLog)."""
        with self.autocast:
            parts = self.loss_fn(self.model(xb), tb, yb)
            if self.features is not None:
                f = self.features
                feat = f.loss(f.student.value, f.teacher.value)
                parts["feature_loss"] = feat
                parts["loss"] = parts["loss"] + f.weight * feat
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return parts

    def _state(self) -> dict:
        return {
            "model": self.model,
            "loss": self.loss_fn,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            **({"features": self.features.loss} if self.features is not None else {}),
        }

    def save(self, epoch: int, seconds: float) -> None:
        if self.ckpt is not None:
            self.ckpt.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.state_dict() for k, v in self._state().items()}
            rng = {"rng": self.order_g.get_state()}
            _save_atomic({**state, **rng, "epoch": epoch, "seconds": seconds}, self.ckpt)

    def resume(self, ctx: StageContext, tag: str) -> tuple[int, float]:
        """(first epoch to run, seconds already spent) from the run's checkpoint, if any."""
        if self.ckpt is None or not self.ckpt.exists():
            return 0, 0.0
        try:
            # Our own file, still loaded with the safe (weights-only) unpickler.
            saved = torch.load(self.ckpt, map_location=ctx.device, weights_only=True)
            for key, obj in self._state().items():
                obj.load_state_dict(saved[key])
            self.order_g.set_state(saved["rng"])  # an older checkpoint's "aug_rng" is unused
        except Exception as e:  # unreadable: start the run over rather than fail the job
            ctx.log(f"ignored an unreadable {tag} checkpoint ({type(e).__name__}); starting over")
            return 0, 0.0
        ctx.log(f"resumed {tag} after epoch {int(saved['epoch']) + 1}")
        return int(saved["epoch"]) + 1, float(saved.get("seconds", 0.0))

    def done(self) -> None:
        # Back from channels_last: safetensors and the exporters want contiguous weights.
        self.model.to(memory_format=torch.contiguous_format).eval()
        if self.ckpt is not None and self.ckpt.exists():
            self.ckpt.unlink()  # the stage's result is checkpointed by the runner from here on


def fit(
    model: nn.Module,
    x: Samples,
    y: torch.Tensor,
    *,
    cfg: TrainConfig,
    loss_fn: nn.Module,
    ctx: StageContext,
    teacher: LogitsFn | None = None,
    teacher_logits: torch.Tensor | None = None,
    features: FeatureTerm | None = None,
    progress_span: tuple[float, float] = (0.0, 1.0),
    tag: str = "train",
    val: tuple[Samples, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Train `model` in place; return the last epoch's mean loss parts and the wall time.

    The teacher signal is either `teacher_logits` (precomputed, indexed by sample; only valid
    without augmentation) or `teacher` (called on every batch). Each epoch goes to
    `ctx.history` as a row named `tag`, with the accuracy on `val` (x, y) when given. Raises
    NanLoss on a non-finite loss and Cancelled (via ctx) between batches.
    """
    run = _Training(model, loss_fn, features, cfg, ctx, len(x), tag)
    start_epoch, seconds_before = run.resume(ctx, tag)
    device = ctx.device
    feed = _Feed(model, x, y, teacher_logits, cfg, device)
    # One forward pass over the validation split per epoch (a tenth of the data by default, no
    # backward): cheap beside the epoch, and only paid when someone keeps the history.
    if val and ctx.wants_history:
        val = (val[0] if isinstance(val[0], Split) else val[0].to(device), val[1].to(device))
    else:
        val = None
    lo, hi = progress_span
    parts: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            order = torch.randperm(len(x), generator=run.order_g)
            losses = _LossLog(tag, epoch)
            for b, idx, xb in feed.epoch(order, epoch):
                if len(idx) < 2:  # batch norm cannot train on a single sample
                    continue
                ctx.check_cancel()
                tb = feed.logits(idx) if teacher_logits is not None else None
                tb = tb if tb is not None else run.teacher_logits(teacher, xb)
                losses.add(b, run.step(xb, feed.y[idx], tb))
            parts = losses.means()  # raises NanLoss before a diverged epoch is checkpointed
            seconds = seconds_before + time.perf_counter() - started
            # Recorded before the checkpoint: an epoch that a crash runs again replaces its row.
            row = _epoch_row(tag, epoch, run.scheduler, parts, model, val, seconds, device)
            ctx.history(row)
            run.save(epoch, seconds)
            msg = " ".join(f"{k}={v:.4f}" for k, v in parts.items())
            frac = lo + (hi - lo) * (epoch + 1) / cfg.epochs
            ctx.progress(frac, f"{tag} epoch {epoch + 1}/{cfg.epochs} {msg}")
    finally:
        feed.close()
    run.done()
    parts["train_seconds"] = time.perf_counter() - started
    return parts


class _Feed:
    """The training batches of one run: sliced on the device from resident tensors, or read
    by a DataLoader from a `Split` (workers kept across epochs); teacher logits likewise.
    With `cfg.augment`, each batch is augmented from its own seed (`augment.batch_seed`): in
    the loader's workers for a split, here for tensors, so both give the same batches."""

    def __init__(self, model, x: Samples, y, logits, cfg: TrainConfig, device) -> None:
        self.x, self.cfg, self.device = x, cfg, device
        self.y = y.to(device)
        self.augmenting = cfg.augment and len(x.shape) == 4  # rows of features are not augmented
        if self.augmenting:
            pipeline_for(*x.shape[2:])  # imported before the loader's workers fork
        self.channels_last = wants_channels_last(model, x, device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.loader = None
        if isinstance(x, Split):
            seed = cfg.seed if self.augmenting else None
            self.loader = training_loader(x, cfg.batch_size, device, augment_seed=seed)
        else:
            self.x = x.to(device)
        # Logits cached on disk stay there (rows read per batch) unless they are small.
        small = logits is not None and logits.nelement() * 4 <= (64 << 20)
        self._logits = logits.to(device) if small else logits

    def shaped(self, xb: torch.Tensor) -> torch.Tensor:
        return xb.contiguous(memory_format=torch.channels_last) if self.channels_last else xb

    def epoch(self, order: torch.Tensor, epoch: int):
        """(batch number, sample positions on the device, inputs on the device) in `order`."""
        bs = self.cfg.batch_size
        if self.loader is None:
            order = order.to(self.device)
            for b in range(-(-len(order) // bs)):
                idx = order[b * bs : (b + 1) * bs]
                xb = self.x[idx]
                if self.augmenting:
                    xb = augment(xb, batch_seed(self.cfg.seed, epoch, b))
                yield b, idx, self.shaped(xb)
            return
        sampler = self.loader.batch_sampler
        sampler.order, sampler.epoch = order.numpy(), epoch
        for b, (xb, pos) in enumerate(self.loader):
            yield b, to_device(pos, self.device), self.shaped(to_device(xb, self.device))

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        if self._logits.device == idx.device:
            return self._logits[idx]
        return to_device(self._logits[idx.cpu()], self.device)

    def close(self) -> None:
        # Persistent workers live as long as the loader's iterator: end them with the run,
        # not whenever a raised exception's traceback lets go of the loader.
        it = getattr(self.loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
        self.loader = None
