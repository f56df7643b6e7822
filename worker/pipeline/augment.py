"""Augmentation of image batches (`distill.augment`) with `torchvision.transforms.v2`.

Each image gets a random crop of its zero-padded self (a shift by up to 1/8 of its side; zero
is the training mean, as batches are normalised first) and a horizontal flip half the time.
transforms.v2 draws its parameters from torch's global RNG, so each batch's draws are made in a
forked RNG seeded from (run seed, epoch, batch number): the same job seed gives the same
augmented batches whichever process applies them (a DataLoader worker for a streamed split,
the training loop for a resident one) and in whatever order the workers finish, and a resumed
run continues the same stream with no generator state of its own to save.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of one batch's augmentation: independent streams per (seed, epoch, batch)."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1, np.uint64)[0])


@lru_cache(maxsize=8)
def pipeline_for(height: int, width: int):
    """The transforms.v2 pipeline for images of height x width (built once per size)."""
    # torchvision takes a second to import: only runs that augment pay for it.
    from torchvision.transforms import v2

    pad = max(1, min(height, width) // 8)
    return v2.Compose(
        [
            v2.RandomCrop((height, width), padding=pad, fill=0, padding_mode="constant"),
            v2.RandomHorizontalFlip(p=0.5),
        ]
    )


def augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """`x` (N,C,H,W, normalised) with each image shifted and flipped at random, drawn from
    `seed` alone; rows of features (N,D) come back as they are."""
    if x.ndim != 4:
        return x
    pipeline = pipeline_for(x.shape[2], x.shape[3])
    # Only the CPU generator is forked: v2 draws every parameter on it, even for CUDA tensors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # One call per image: a v2 transform given a batch draws one crop and flip for all.
        return torch.stack([pipeline(image) for image in x])
