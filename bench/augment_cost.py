"""Where `distill.augment` should run: per batch or per sample, in the loop or in DataLoader
workers. A probe, not a benchmark with a target (`python -m bench` does not run it).

On batches of 64 x 3 x 224 x 224 (uint8 rows read from a file, normalised to float32, then
shifted and flipped by `worker.pipeline.augment`), it times:

- the CPU cost of one batch in one process (1 thread): reading + normalising, and augmenting,
  per batch (one read, one normalisation, one seeded augmentation of the 64 images) against
  per sample (64 reads, normalisations and augmentations, then collated);
- what the training loop waits for a batch (no model) when a DataLoader with `--workers`
  workers reads it: without augmentation, augmented in the workers per batch (the job's way),
  augmented per sample in the workers, and augmented in the loop after the loader.

    python -m bench.augment_cost [--batches 24] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from worker.pipeline.augment import augment, batch_seed, pipeline_for
from worker.pipeline.limits import DataSettings
from worker.pipeline.samples import Normaliser, RecordFile, Split, training_loader

SHAPE = (3, 224, 224)
BATCH = 64


class _PerSample(Dataset):
    """The alternative: one sample read, normalised and augmented per `__getitem__`."""

    def __init__(self, split: Split, seed: int) -> None:
        self.split, self.seed = split, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.split.read(np.asarray([i]))
        return augment(x, batch_seed(self.seed, 0, i))[0]


def _median_ms(fn, n: int) -> float:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _split(folder: Path, n: int, workers: int) -> Split:
    path = folder / "images.u8"
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(0, n, BATCH):
            f.write(rng.integers(0, 256, (BATCH, *SHAPE), dtype=np.uint8).tobytes())
    rows = RecordFile(path, offset=0, dtype=np.uint8, sample_shape=SHAPE, n=n)
    norm = Normaliser(1 / 255, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))
    settings = DataSettings(workers=workers, resident_bytes=0)
    return Split(rows, np.arange(n), norm, settings)


def _loader_ms(loader, order: np.ndarray, augment_in_loop: bool) -> float:
    """Wall ms per batch the loop waits, over one pass (the first batch excluded)."""
    sampler = loader.batch_sampler
    if sampler is not None and hasattr(sampler, "order"):
        sampler.order = order
    it = iter(loader)
    next(it)
    t0, count = time.perf_counter(), 0
    for b, batch in enumerate(it):
        xb = batch[0] if isinstance(batch, tuple | list) else batch
        if augment_in_loop:
            augment(xb, batch_seed(0, 0, b))
        count += 1
    return 1e3 * (time.perf_counter() - t0) / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.augment_cost")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipeline_for(*SHAPE[1:])  # imported before any worker forks
    with tempfile.TemporaryDirectory() as tmp:
        split = _split(Path(tmp), args.batches * BATCH, args.workers)
        pos = np.arange(BATCH)
        x = split.read(pos)
        per_sample = _PerSample(split, 0)
        print(f"one batch of {BATCH} x {'x'.join(map(str, SHAPE))}, one process, median ms:")
        rows = {
            "read + normalise, per batch": lambda i: split.read(pos),
            "read + normalise, per sample": lambda i: torch.stack(
                [split.read(np.asarray([j]))[0] for j in pos]
            ),
            "augment, per batch (64 images, one seed)": lambda i: augment(x, i),
            "read + normalise + augment, per batch": lambda i: augment(split.read(pos), i),
            "read + normalise + augment, per sample": lambda i: torch.stack(
                [per_sample[j] for j in pos]
            ),
        }
        for name, fn in rows.items():
            print(f"  {name:45s} {_median_ms(fn, 7):7.1f}")
        order = np.random.default_rng(0).permutation(len(split))
        w = args.workers
        print(f"the loop's wait per batch, DataLoader with {w} workers, ms:")
        cpu = torch.device("cpu")
        results = {
            "no augmentation": _loader_ms(training_loader(split, BATCH, cpu), order, False),
            "augmented in the workers, per batch": _loader_ms(
                training_loader(split, BATCH, cpu, augment_seed=0), order, False
            ),
            "augmented in the workers, per sample": _loader_ms(
                DataLoader(
                    per_sample,
                    batch_size=BATCH,
                    sampler=order.tolist(),
                    num_workers=w,
                    prefetch_factor=4 if w else None,
                ),  # fmt: skip
                order,
                False,
            ),
            "augmented in the loop, per batch": _loader_ms(
                training_loader(split, BATCH, cpu), order, True
            ),
        }
        for name, ms in results.items():
            print(f"  {name:45s} {ms:7.1f}")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
