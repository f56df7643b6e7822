"""Samples read per batch from where they live (memory or a file on disk), normalised per batch.

A split is a `Split`: the rows of a source (an in-memory array, a `Dataset` read through its
own `__getitem__`, or fixed-size records in a file read with `os.pread`) picked by an index list, scaled and standardised as they are read.
Memory stays flat in the number of samples: nothing holds a whole split, and the file's pages
go through the page cache rather than into the job's mappings (a memory map would count every
page it ever read in the process's resident and proportional set sizes).

Training reads batches through a `torch.utils.data.DataLoader` (worker processes, which also
augment them when asked; pinned memory and non-blocking copies on CUDA); prediction and evaluation read in batches sized from
a memory budget and the model's activation bytes per sample.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from worker.pipeline.augment import augment, batch_seed
from worker.pipeline.limits import DataSettings

__all__ = ["DataSettings", "DatasetSource", "RecordFile", "Split"]

MAX_PREDICT_BATCH = 1024  # more gains nothing on these models and delays the first progress


# --- sources: where the raw rows live -------------------------------------------------------


class ArraySource:
    """Raw rows held in memory (the built-in digits). `hwc`: stored N,H,W,C and handed out
    N,C,H,W."""

    def __init__(self, array: np.ndarray, *, hwc: bool = False) -> None:
        self.array, self.hwc = array, hwc
        shape = array.shape[1:]
        self.sample_shape = (shape[2], shape[0], shape[1]) if hwc else tuple(shape)
        self.dtype = array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = self.array[rows]
        return out.transpose(0, 3, 1, 2) if self.hwc else out


class DatasetSource:
    """Rows read one sample at a time through a `torch.utils.data.Dataset`'s own `__getitem__`
    (torchvision's CIFAR10, MNIST, FashionMNIST): whatever the class keeps and however it
    decodes, a split reads only the samples it asks for. A PIL image (what those classes hand
    out without a transform) becomes uint8 C,H,W; a tensor or array is taken as C,H,W already.
    Labels come separately (through `__getitem__` they would cost a decode each). Picklable
    when the dataset is, as DataLoader workers started by spawn need."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        first = self._sample(0)
        self.sample_shape, self.dtype = tuple(first.shape), first.dtype

    def __len__(self) -> int:
        return len(self.dataset)

    def _sample(self, i: int) -> np.ndarray:
        x = self.dataset[i][0]
        if isinstance(x, torch.Tensor):
            return x.numpy()
        if isinstance(x, Image.Image):
            # np.asarray: 11 us for a 28x28 image where a PILToTensor transform costs 35-70 us.
            hwc = np.asarray(x)
            return hwc[None] if hwc.ndim == 2 else hwc.transpose(2, 0, 1)
        return np.asarray(x)

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.sample_shape), self.dtype)
        for k, i in enumerate(rows.tolist()):
            out[k] = self._sample(i)
        return out


class RecordFile:
    """Fixed-size records of `dtype` x `sample_shape` in a file from byte `offset` (an image
    cache, or an uncompressed .npy inside a .npz), read with `os.pread`: no mapping, so the
    process holds only the rows it asked for. Picklable (DataLoader workers reopen the file)."""

    def __init__(
        self, path: Path, *, offset: int, dtype: np.dtype, sample_shape: tuple[int, ...], n: int
    ) -> None:
        self.path, self.offset, self.n = Path(path), offset, n
        self.dtype, self.sample_shape = np.dtype(dtype), tuple(sample_shape)
        self.row_bytes = math.prod(self.sample_shape) * self.dtype.itemsize
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __len__(self) -> int:
        return self.n

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows, in the order asked; consecutive rows are read in one call."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.sample_shape), self.dtype)
        if not len(rows):
            return out
        flat = out.reshape(len(rows), -1).view(np.uint8)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        breaks = np.flatnonzero(np.diff(srt) != 1) + 1
        fd = self._file()
        for run in np.split(np.arange(len(srt)), breaks):
            first, count = int(srt[run[0]]), len(run)
            data = os.pread(fd, count * self.row_bytes, self.offset + first * self.row_bytes)
            if len(data) != count * self.row_bytes:
                raise OSError(f"{self.path.name}: cut short at row {first}")
            flat[order[run]] = np.frombuffer(data, np.uint8).reshape(count, self.row_bytes)
        return out

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


# --- normalisation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Normaliser:
    """x = (raw * scale - mean) / std, per channel (images) or per feature (rows)."""

    scale: float
    mean: np.ndarray  # float32, one per channel or feature
    std: np.ndarray

    def apply(self, raw: np.ndarray) -> torch.Tensor:
        """A float32 tensor of the normalised rows, made in one buffer: a batch of 64 images
        at 224 px is 38 MB, and each temporary would cost as much again."""
        shape = (1, -1, 1, 1) if raw.ndim == 4 else (1, -1)
        x = torch.from_numpy(raw.astype(np.float32))  # the one copy (and dtype conversion)
        x.mul_(float(np.float32(self.scale)))
        x.sub_(torch.from_numpy(self.mean.reshape(shape)))
        return x.div_(torch.from_numpy(self.std.reshape(shape)))


STATS_CHUNK_BYTES = 32 << 20


def streaming_stats(source: Any, rows: np.ndarray, scale: float, progress=None) -> Normaliser:
    """Mean and (population) std of `rows` of `source` after scaling, in one pass of chunks
    (float64 sums: 16k images of 224 px are 2.4 G values)."""
    per = max(1, STATS_CHUNK_BYTES // max(1, math.prod(source.sample_shape)))
    ordered = np.sort(rows)  # in file order: sequential reads
    total = sq = None
    count = 0
    for start in range(0, len(ordered), per):
        raw = source.read(ordered[start : start + per]).astype(np.float64) * scale
        axes = (0, 2, 3) if raw.ndim == 4 else (0,)
        s, q = raw.sum(axis=axes), np.square(raw).sum(axis=axes)
        total, sq = (s, q) if total is None else (total + s, sq + q)
        count += raw.size // len(s)
        if progress is not None:
            progress(min(start + per, len(ordered)) / len(ordered))
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return Normaliser(scale, mean.astype(np.float32), std.astype(np.float32))


# --- splits ---------------------------------------------------------------------------------


class Split:
    """Rows `indices` of `source`, normalised when read. Indexes like a tensor (an int, a
    slice, an index tensor or array give float32 tensors), so code written for in-memory
    tensors (`x[:1]`, `len(x)`, `x.shape`) works on it unchanged."""

    def __init__(
        self, source: Any, indices: np.ndarray, norm: Normaliser, settings: DataSettings
    ) -> None:
        self.source, self.indices, self.norm = source, np.asarray(indices, np.int64), norm
        self.settings = settings

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.source.sample_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole split as normalised float32."""
        return math.prod(self.shape) * 4

    def read(self, positions: np.ndarray) -> torch.Tensor:
        return self.norm.apply(self.source.read(self.indices[positions]))

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key])
        if isinstance(key, int | np.integer):
            return self.read(np.asarray([key]))[0]
        return self.read(np.asarray(key, np.int64))

    def subset(self, positions: np.ndarray) -> Split:
        return Split(self.source, self.indices[positions], self.norm, self.settings)

    def resident(self) -> torch.Tensor | Split:
        """The whole split as one tensor when it is small enough, else itself."""
        return self[:] if self.nbytes <= self.settings.resident_bytes else self


Samples = torch.Tensor | Split  # what the stages accept as inputs


# --- feeding a device -----------------------------------------------------------------------


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto `device`: through pinned memory and without waiting on CUDA."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def wants_channels_last(model: nn.Module, x: Samples, device: torch.device) -> bool:
    """Conv nets on CUDA run faster on NHWC tensors (cuDNN's native layout for tensor cores);
    on CPU the default kernels gain nothing here, so the layout stays."""
    return (
        device.type == "cuda"
        and len(x.shape) == 4
        and any(isinstance(m, nn.Conv2d) for m in model.modules())
    )


def batches(x: Samples, batch_size: int, start: int = 0) -> Iterator[torch.Tensor]:
    """`x` in order from row `start`, `batch_size` rows at a time, on the host."""
    for i in range(start, len(x), batch_size):
        yield x[i : i + batch_size]


def traced(fn: Any, sample: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`fn(sample)` and the bytes its forward pass keeps per sample: the sum of every module's
    outputs (an upper bound under no_grad, where most are freed as the pass goes). Callables
    whose layers cannot be hooked (TorchScript, ONNX) count 64 x the input."""
    n = max(len(sample), 1)
    if not isinstance(fn, nn.Module) or isinstance(fn, torch.jit.ScriptModule):
        return fn(sample), 64 * sample.nelement() * sample.element_size() // n
    total = [sample.nelement() * sample.element_size()]

    def hook(_m, _i, out) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.nelement() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in fn.modules() if m is not fn]
    try:
        out = fn(sample)
    finally:
        for h in handles:
            h.remove()
    return out, total[0] // n


def batch_size_for(per_sample: int, budget: int, n: int) -> int:
    """The prediction batch: what `budget` holds at `per_sample` bytes, within 1..1024 and n."""
    return max(1, min(budget // max(per_sample, 1), MAX_PREDICT_BATCH, max(n, 1)))


# --- the training loader --------------------------------------------------------------------


class _Rows(Dataset):
    """A split read a whole batch at a time (DataLoader calls `__getitems__` with what the
    `EpochOrder` sampler yields: the batch's positions and its augmentation seed): one read,
    one normalisation and one augmentation call per batch, in the worker process."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(
        self, request: tuple[list[int], int | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions, seed = request
        pos = np.asarray(positions, np.int64)
        x = self.split.read(pos)
        return (x if seed is None else augment(x, seed)), torch.from_numpy(pos)

    def __getitem__(self, position: int):  # DataLoader's contract; batches use __getitems__
        return self.__getitems__(([position], None))


class EpochOrder(Sampler[tuple[list[int], int | None]]):
    """The batches of the current epoch's order, each with its augmentation seed (None when
    not augmenting). The training loop sets `order` and `epoch` before each epoch, so
    persistent workers serve every epoch."""

    def __init__(self, batch_size: int, augment_seed: int | None = None) -> None:
        self.batch_size, self.augment_seed = batch_size, augment_seed
        self.order = np.zeros(0, np.int64)
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[list[int], int | None]]:
        for b, i in enumerate(range(0, len(self.order), self.batch_size)):
            seed = self.augment_seed
            seed = None if seed is None else batch_seed(seed, self.epoch, b)
            yield self.order[i : i + self.batch_size].tolist(), seed

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)


def _as_is(batch):
    return batch


def training_loader(
    split: Split, batch_size: int, device: torch.device, augment_seed: int | None = None
) -> DataLoader:
    """Batches of `split` in the order its `EpochOrder` sampler is given, read (and augmented,
    with `augment_seed`) in worker processes ahead of the loop; pinned for a non-blocking copy
    on CUDA."""
    workers = split.settings.resolved_workers()
    return DataLoader(
        _Rows(split),
        batch_sampler=EpochOrder(batch_size, augment_seed),
        collate_fn=_as_is,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
