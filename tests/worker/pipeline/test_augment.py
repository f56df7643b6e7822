"""Augmentation (`distill.augment`): random shifts and flips with torchvision.transforms.v2,
the same for the same job seed wherever and whenever a batch is augmented."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.pipeline.archs import build_model
from worker.pipeline.augment import augment, batch_seed
from worker.pipeline.context import StageContext
from worker.pipeline.data import load_dataset
from worker.pipeline.limits import DataSettings
from worker.pipeline.losses import CrossEntropyOnly
from worker.pipeline.spec import BuiltinDataset
from worker.pipeline.train import TrainConfig, fit

STREAM = DataSettings(workers=2, resident_bytes=0)  # read and augmented in worker processes


def _images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _which(image: torch.Tensor, out: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) that turns `image` into `out`, worked out by hand."""
    _, h, w = image.shape
    padded = F.pad(image, (pad, pad, pad, pad))
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            for flip in (False, True):
                if torch.equal(crop.flip(-1) if flip else crop, out):
                    found.append((dy, dx, flip))
    return found


def test_each_image_is_a_zero_padded_shift_of_itself_flipped_or_not():
    x = _images()
    out = augment(x, seed=7)
    assert out.shape == x.shape
    drawn = []
    for image, got in zip(x, out, strict=True):
        found = _which(image, got, pad=1)  # 1/8 of 8 pixels
        assert found, "not a shift (by at most 1 pixel) of the image, flipped or not"
        drawn.append(found[0])
    # Random per image: several shifts and both flips among 32 images, not one for the batch.
    assert len({d[:2] for d in drawn}) >= 4
    assert {d[2] for d in drawn} == {False, True}


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    x = _images()
    assert torch.equal(augment(x, 3), augment(x, 3))
    assert not torch.equal(augment(x, 3), augment(x, 4))
    seeds = {batch_seed(0, e, b) for e in range(3) for b in range(3)} | {batch_seed(1, 0, 0)}
    assert len(seeds) == 10  # every (seed, epoch, batch) has its own stream


def test_augmenting_leaves_the_global_rng_where_it_was():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    augment(_images(), 11)
    assert torch.equal(torch.rand(3), expected)


def test_feature_rows_are_not_augmented():
    rows = torch.randn(16, 5)
    assert augment(rows, 0) is rows


def _fit(data, seed: int, augment: bool = True):
    torch.manual_seed(0)
    model = build_model("cnn_tiny", data.input_shape, data.num_classes)
    cfg = TrainConfig(
        epochs=2, lr=3e-3, weight_decay=0.0, batch_size=64, augment=augment, seed=seed
    )
    fit(model, data.x_train, data.y_train, cfg=cfg, loss_fn=CrossEntropyOnly(), ctx=StageContext())
    return model.state_dict()


def _same(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_an_augmented_run_is_reproducible_from_its_seed_and_changes_with_it():
    data = load_dataset(BuiltinDataset(max_samples=300), seed=0)
    first, again, other = _fit(data, seed=0), _fit(data, seed=0), _fit(data, seed=1)
    assert _same(first, again)
    assert not _same(first, other)  # another seed: other shuffles and other shifts
    # Same seed, same shuffling: the augmentation alone changed the batches.
    assert not _same(first, _fit(data, seed=0, augment=False))


def test_batches_augmented_in_loader_workers_train_the_same_model_as_in_the_loop():
    spec = BuiltinDataset(max_samples=300)
    resident = _fit(load_dataset(spec, seed=0), seed=0)
    streamed = _fit(load_dataset(spec, seed=0, settings=STREAM), seed=0)
    assert _same(resident, streamed)
