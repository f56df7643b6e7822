import math

import pytest
import torch
import torch.nn.functional as F

from worker.pipeline.losses import (
    FEATURE_LOSSES,
    KD_LOSSES,
    AttentionTransfer,
    FitNetsHint,
    HintonKD,
)
from worker.pipeline.registry import UnknownName


def _reference_kd(s, t, y, T, alpha):
    """Hinton KD written out from the definition, sample by sample."""
    total = 0.0
    for i in range(len(s)):
        p_t = torch.softmax(t[i] / T, 0)
        log_p_s = torch.log_softmax(s[i] / T, 0)
        kl = float((p_t * (p_t.log() - log_p_s)).sum())
        total += kl
    kd = total / len(s) * T * T
    ce = float(F.cross_entropy(s, y))
    return alpha * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (8.0, 0.3)])
def test_hinton_kd_matches_the_definition(T, alpha):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    parts = HintonKD(T, alpha)(s, t, y)
    loss, kd, ce = _reference_kd(s, t, y, T, alpha)
    assert math.isclose(float(parts["loss"]), loss, rel_tol=1e-5)
    assert math.isclose(float(parts["kd_loss"]), kd, rel_tol=1e-5)
    assert math.isclose(float(parts["task_loss"]), ce, rel_tol=1e-5)


def test_kd_is_zero_when_student_equals_teacher_and_differs_from_the_blog_bug():
    t = torch.randn(8, 5)
    y = torch.zeros(8, dtype=torch.long)
    assert float(HintonKD(4.0, 1.0)(t.clone(), t, y)["kd_loss"]) == pytest.approx(0.0, abs=1e-6)
    # The common mistake: KLDivLoss fed log() of both distributions.
    s = torch.randn(8, 5)
    wrong = (
        torch.nn.KLDivLoss(reduction="batchmean")(
            torch.log_softmax(s / 4, 1), torch.log_softmax(t / 4, 1)
        )
        * 16
    )
    right = HintonKD(4.0, 1.0)(s, t, y)["kd_loss"]
    assert float(right) >= 0 and not torch.isclose(right, wrong)


def test_alpha_zero_is_plain_cross_entropy():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    assert torch.isclose(HintonKD(4.0, 0.0)(s, t, y)["loss"], F.cross_entropy(s, y))


def test_unknown_loss_lists_known_names():
    with pytest.raises(UnknownName, match="known: ce, kd"):
        KD_LOSSES.get("dkd")
    assert set(FEATURE_LOSSES.names()) >= {"hint", "at"}


def test_feature_losses_vanish_on_matching_maps_and_train_the_regressor():
    f = torch.randn(4, 8, 6, 6)
    assert float(AttentionTransfer()(f, f)) == pytest.approx(0.0, abs=1e-7)
    # Attention transfer compares maps of different widths and sizes.
    assert float(AttentionTransfer()(torch.randn(4, 3, 12, 12), f)) > 0
    hint = FitNetsHint(3, 8)
    s = torch.randn(4, 3, 6, 6, requires_grad=True)
    hint(s, f).backward()
    assert hint.regressor.weight.grad is not None and hint.regressor.weight.grad.abs().sum() > 0
