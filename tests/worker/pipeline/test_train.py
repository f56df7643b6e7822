"""The shared training loop's bookkeeping: loss parts are read in blocks, not per batch, and
still report the mean of every batch and the first batch whose loss is not finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.pipeline import train
from worker.pipeline.errors import NanLoss
from worker.pipeline.train import TrainConfig, fit


class Recorded(nn.Module):
    """Cross-entropy that remembers each batch's value, and turns batch `nan_at` into NaN."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.seen: list[float] = []
        self.nan_at = nan_at

    def forward(self, out, _teacher, y):
        loss = F.cross_entropy(out, y)
        if len(self.seen) + 1 == self.nan_at:
            loss = loss * float("nan")
        self.seen.append(float(loss.detach()))
        return {"loss": loss, "task_loss": loss * 2}


def _fit(ctx, loss_fn, epochs=1):
    torch.manual_seed(0)
    x, y = torch.randn(400, 6), torch.randint(0, 3, (400,))  # 100 batches of 4: 3+ blocks
    cfg = TrainConfig(epochs=epochs, lr=1e-2, weight_decay=0.0, batch_size=4)
    return fit(nn.Linear(6, 3), x, y, cfg=cfg, loss_fn=loss_fn, ctx=ctx)


def test_epoch_means_are_the_mean_of_every_batch(ctx):
    assert 100 % train.SYNC_EVERY  # a last, partial block is read too
    loss_fn = Recorded()
    parts = _fit(ctx, loss_fn, epochs=2)
    last_epoch = loss_fn.seen[100:]
    assert len(last_epoch) == 100
    assert parts["loss"] == pytest.approx(sum(last_epoch) / 100, rel=1e-5)
    assert parts["task_loss"] == pytest.approx(2 * parts["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "epoch, batch", [(1, 1), (1, train.SYNC_EVERY + 3), (1, 100), (2, train.SYNC_EVERY + 3)]
)
def test_a_non_finite_loss_names_the_batch_it_first_appeared_in(ctx, epoch, batch):
    with pytest.raises(NanLoss, match=rf"loss became nan at epoch {epoch}, batch {batch};"):
        _fit(ctx, Recorded(nan_at=(epoch - 1) * 100 + batch), epochs=2)
    # The diverged epoch was never checkpointed: a resume starts after the last good one.
    ckpt = ctx.checkpoint_dir / "train.pt"
    if epoch == 1:
        assert not ckpt.exists()
    else:
        assert torch.load(ckpt, weights_only=True)["epoch"] == 0
        assert torch.isfinite(torch.load(ckpt, weights_only=True)["model"]["weight"]).all()
