"""Distillation losses. Each is a module whose forward returns a dict of named parts
(`loss` is what gets minimised; the rest is logged), as timm's distillation task does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from worker.pipeline.registry import Registry

KD_LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss")
FEATURE_LOSSES: Registry[Callable[..., nn.Module]] = Registry("feature loss")


def build_kd_loss(spec) -> nn.Module:
    """The spec's KD loss (`distill.loss`, `temperature`, `alpha`): distillation and the
    prune stage's fine-tune build it here, the same way."""
    return KD_LOSSES.get(spec.loss)(temperature=spec.temperature, alpha=spec.alpha)


@KD_LOSSES.register("kd")
class HintonKD(nn.Module):
    """alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    KLDivLoss takes the student's *log*-probabilities and the teacher's probabilities
    (here as log-probabilities with log_target=True); feeding log() of both, or raw softmax
    of the student, is the common bug. T^2 keeps the soft-target gradients on the same scale
    as the hard-label ones when T changes (Hinton et al., 2015).
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        task = F.cross_entropy(student_logits, target)
        if teacher_logits is None or self.alpha == 0.0:
            return {"loss": task, "task_loss": task}
        t = self.temperature
        kd = F.kl_div(
            F.log_softmax(student_logits.float() / t, dim=1),
            F.log_softmax(teacher_logits.float() / t, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        loss = self.alpha * kd + (1.0 - self.alpha) * task
        return {"loss": loss, "kd_loss": kd, "task_loss": task}


@KD_LOSSES.register("ce")
class CrossEntropyOnly(nn.Module):
    """Plain training on labels: the no-teacher baseline, selectable as a loss for comparison."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.0) -> None:
        super().__init__()

    def forward(self, student_logits, teacher_logits, target) -> dict[str, torch.Tensor]:
        task = F.cross_entropy(student_logits, target)
        return {"loss": task, "task_loss": task}


def _match_spatial(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
        s = F.adaptive_avg_pool2d(s, t.shape[-2:])
    return s


@FEATURE_LOSSES.register("hint")
class FitNetsHint(nn.Module):
    """FitNets (Romero et al., 2015): MSE between a teacher layer and a student layer mapped
    through a learned 1x1 conv (or linear) regressor to the teacher's width."""

    def __init__(self, student_channels: int, teacher_channels: int, conv: bool = True) -> None:
        super().__init__()
        self.regressor = (
            nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
            if conv
            else nn.Linear(student_channels, teacher_channels, bias=False)
        )

    def forward(self, s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
        s = _match_spatial(self.regressor(s_feat.float()), t_feat)
        return F.mse_loss(s, t_feat.float())


@FEATURE_LOSSES.register("at")
class AttentionTransfer(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, 2017): match L2-normalised spatial maps of
    summed squared activations; widths may differ, no parameters."""

    def __init__(self, student_channels: int = 0, teacher_channels: int = 0, conv: bool = True):
        super().__init__()
        if not conv:
            raise ValueError("attention transfer needs convolutional (N,C,H,W) feature maps")

    @staticmethod
    def _attention(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)

    def forward(self, s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
        s = _match_spatial(s_feat, t_feat)
        # Squared L2 distance between unit-norm maps (0..4), averaged over the batch; the paper
        # scales it by beta=1000/2 with mean-reduced maps, which `weight` in the spec plays.
        return (self._attention(s) - self._attention(t_feat)).pow(2).sum(1).mean()
