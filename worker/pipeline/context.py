"""What a stage gets besides its inputs: device, progress, cancel check, checkpoint folder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.pipeline.errors import Cancelled

log = logging.getLogger("distillery.pipeline")

ProgressFn = Callable[[str, float, str], None]  # (stage, fraction of that stage, message)
HistoryFn = Callable[[dict[str, Any]], None]  # one row of worker.pipeline.history.HISTORY_COLUMNS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this host")
    return device


@dataclass
class StageContext:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint_dir: Path | None = None
    on_progress: ProgressFn | None = None
    should_cancel: Callable[[], bool] | None = None
    stage: str = ""
    on_history: HistoryFn | None = None

    def progress(self, fraction: float, message: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(self.stage, min(max(fraction, 0.0), 1.0), message)

    def log(self, message: str) -> None:
        log.info("%s: %s", self.stage, message)
        if self.on_progress is not None:
            self.on_progress(self.stage, -1.0, message)  # -1: a log line, no progress change

    @property
    def wants_history(self) -> bool:
        """Someone keeps the training curves: worth measuring validation accuracy per epoch."""
        return self.on_history is not None

    def history(self, row: dict[str, Any]) -> None:
        """Record one finished epoch of a training run (`row` without `stage`: this stage's)."""
        if self.on_history is not None:
            self.on_history({"stage": self.stage, **row})

    def check_cancel(self) -> None:
        """Called at batch boundaries: raises Cancelled when the job was asked to stop."""
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled(f"cancelled during {self.stage or 'the job'}")

    def for_step(self, stage: str, step: str) -> StageContext:
        """A context for one step of `stage` with checkpoints of its own (a search trains many
        students in one stage: each keeps its own epochs)."""
        ckpt = self.checkpoint_dir / step if self.checkpoint_dir is not None else None
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)
        return StageContext(
            self.device, ckpt, self.on_progress, self.should_cancel, stage, self.on_history
        )

    def for_stage(self, stage: str) -> StageContext:
        ckpt = self.checkpoint_dir / stage if self.checkpoint_dir is not None else None
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)
        return StageContext(
            self.device, ckpt, self.on_progress, self.should_cancel, stage, self.on_history
        )
