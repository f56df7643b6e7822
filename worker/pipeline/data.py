"""Datasets: load, validate, split (seeded, stratified) and normalise, read per batch.

Every source ends as a `DataBundle` of splits. A split is an index list into its source (an
in-memory array, a torchvision dataset read through its own class, an uncompressed .npz member
in place, or a decoded-image cache on disk),
normalised per batch by statistics from one streaming pass over the training rows
(`samples.Split`); a dataset small enough (`DataSettings.resident_bytes`) is held as tensors
instead. The bundle's `input_contract` is what a user needs to feed the exported model
(layout, dtype, scaling, per-channel mean/std, class names).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from worker.pipeline.archives import MAX_TOTAL_BYTES
from worker.pipeline.checks import (
    MAX_CLASSES,
    NOT_FINITE,
    as_float32,
    check_class_counts,
    check_label_range,
    check_layout,
    check_npz_file,
    labels_as_int,
    validate_arrays,
)
from worker.pipeline.errors import DatasetError
from worker.pipeline.imagecache import MAX_IMAGE_PIXELS, build_image_cache
from worker.pipeline.limits import DataSettings
from worker.pipeline.npz import open_npz
from worker.pipeline.registry import Registry
from worker.pipeline.samples import ArraySource, DatasetSource, Samples, Split, streaming_stats
from worker.pipeline.spec import (
    BuiltinDataset,
    ImageFolderDataset,
    NpzDataset,
    TorchvisionDataset,
)

__all__ = [  # the checks and the pixel cap stay importable from here, where callers found them
    "MAX_CLASSES",
    "MAX_IMAGE_PIXELS",
    "NOT_FINITE",
    "as_float32",
    "check_npz_file",
    "validate_arrays",
    "DataBundle",
    "load_dataset",
]

RawData = tuple[np.ndarray, np.ndarray, list[str] | None, float]  # x, y, class names, scale
Progress = Callable[[float, str], None]  # (fraction of the data stage, message)

BUILTIN_DATASETS: Registry[Callable[[], RawData]] = Registry("builtin dataset")
TORCHVISION_DATASETS: Registry[str] = Registry("torchvision dataset")
for _name in ("CIFAR10", "MNIST", "FashionMNIST"):
    TORCHVISION_DATASETS.add(_name, _name)


@dataclass
class DataBundle:
    """The splits: tensors for a small dataset, `Split`s read per batch for a large one (both
    index, slice and `len` alike); labels are always tensors."""

    x_train: Samples
    y_train: torch.Tensor
    x_test: Samples
    y_test: torch.Tensor
    num_classes: int
    class_names: list[str]
    input_contract: dict[str, Any] = field(default_factory=dict)
    # Held out of the training split to choose between models (never used for training).
    x_val: Samples | None = None
    y_val: torch.Tensor | None = None
    # What reading the data took: bytes, decode seconds and throughput, where it lives.
    info: dict[str, Any] = field(default_factory=dict)
    settings: DataSettings = field(default_factory=DataSettings)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def val(self) -> tuple[Samples, torch.Tensor] | None:
        """The validation split as (x, y), or None when the spec holds none out."""
        if self.x_val is None or self.y_val is None:
            return None
        return self.x_val, self.y_val

    @property
    def is_image(self) -> bool:
        return len(self.x_train.shape) == 4

    def calibration(self, n: int, seed: int) -> Samples:
        """A seeded subset of the training split for int8 calibration (a `Split` of it when
        the data is read per batch: calibration streams too)."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.x_train), generator=g)[: min(n, len(self.x_train))]
        if isinstance(self.x_train, Split):
            return self.x_train.subset(idx.numpy())
        return self.x_train[idx]

    def summary(self) -> dict[str, Any]:
        return {
            "num_train": len(self.x_train),
            "num_test": len(self.x_test),
            "num_val": 0 if self.x_val is None else len(self.x_val),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            **self.info,
        }


@BUILTIN_DATASETS.register("digits")
def _digits() -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None, :, :]  # N,1,8,8 with values 0..16
    return x, d.target.astype(np.int64), [str(c) for c in d.target_names], 1.0 / 16.0


# --- sources -------------------------------------------------------------------------------


def load_npz(path: Path, *, max_total_bytes: int = MAX_TOTAL_BYTES) -> RawData:
    """x, y and optional class names from a .npz; its arrays may expand to `max_total_bytes`."""
    check_npz_file(path, max_total_bytes=max_total_bytes)
    try:
        # allow_pickle stays off: an object array would need unpickling, and is refused here.
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise DatasetError(
                    f"{path.name}: missing array(s) {sorted(missing)}; it holds {sorted(npz.files)}"
                )
            arrays = {k: npz[k] for k in ("x", "y", "classes") if k in npz.files}
            raw = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
            if raw:
                # np.load hands back the bytes of a member that is not a .npy array.
                raise DatasetError(
                    f"{path.name}: {', '.join(raw)} must be .npy arrays (as np.savez writes them)"
                )
            x, y = arrays["x"], arrays["y"]
            names = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    except DatasetError:
        raise
    except ValueError as e:
        if "object arrays cannot be loaded" in str(e).lower():
            raise DatasetError(
                f"{path.name}: holds object arrays, which would need unpickling; save plain numeric arrays"
            ) from None
        raise DatasetError(f"{path.name}: not a readable .npz file ({e})") from None
    except Exception as e:  # zipfile/OSError/… on corrupt input
        raise DatasetError(f"{path.name}: not a readable .npz file ({e})") from None
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    return x, y, names, scale


def _load_torchvision(spec: TorchvisionDataset) -> tuple[RawData, RawData]:
    """The official train and test splits, each a `DatasetSource` over torchvision's own
    class (its `__getitem__`, PIL images to uint8 C,H,W), with its labels."""
    from torchvision import datasets  # torchvision loads slowly: only where it is read

    cls = getattr(datasets, TORCHVISION_DATASETS.get(spec.name))
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=spec.root, train=train, download=spec.download)
            if not len(ds):
                raise ValueError("no samples")
            source = DatasetSource(ds)
        except RuntimeError as e:
            hint = (
                ""
                if spec.download
                else " (pre-fill the data root, or set dataset.download: true where downloads are allowed)"
            )
            raise DatasetError(f"{spec.name} not found under {spec.root}{hint}: {e}") from None
        except (ValueError, AssertionError, KeyError, TypeError, OSError, IndexError) as e:
            raise DatasetError(
                f"{spec.name} files under {spec.root} are unreadable ({type(e).__name__}: {e})"
            ) from None
        # Labels from the class's list of them: one int a sample, no image decoded.
        splits.append((source, np.asarray(ds.targets), list(ds.classes), 1.0 / 255.0))
    return splits[0], splits[1]


# --- assembly ------------------------------------------------------------------------------


def _split(x, y, test_fraction: float, seed: int):
    counts = np.bincount(y)
    if counts.min() < 2:
        raise DatasetError(
            f"class {int(np.argmin(counts))} has {int(counts.min())} sample(s); each class needs at "
            "least 2 to hold one out for evaluation"
        )
    n_test = max(int(round(len(y) * test_fraction)), len(counts))
    if len(y) - n_test < len(counts):
        raise DatasetError(f"{len(y)} samples are too few to split across {len(counts)} classes")
    return train_test_split(x, y, test_size=n_test, random_state=seed, stratify=y)


@dataclass
class _Source:
    """A dataset's rows where they live, its labels, names and scale, and the source's own
    test split when it ships one."""

    x: Any  # samples.ArraySource, DatasetSource or RecordFile
    y: np.ndarray
    names: list[str] | None
    scale: float
    origin: str
    test: _Source | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _source(spec: Any, workdir: Path | None, settings: DataSettings, progress) -> _Source:
    """Where a dataset spec's rows come from."""
    if isinstance(spec, BuiltinDataset):
        x, y, names, scale = BUILTIN_DATASETS.get(spec.name)()
        return _Source(ArraySource(x), y, names, scale, f"builtin:{spec.name}")
    if isinstance(spec, NpzDataset):
        npz = open_npz(Path(spec.path), _work(workdir), max_total_bytes=MAX_TOTAL_BYTES)
        return _Source(npz.x, npz.y, npz.class_names, npz.scale, "npz", info=npz.info)
    if isinstance(spec, ImageFolderDataset):
        cache = build_image_cache(
            Path(spec.path),
            spec.image_size,
            spec.grayscale,
            _work(workdir),
            settings=settings,
            progress=progress,
            max_image_pixels=MAX_IMAGE_PIXELS,
        )
        return _Source(
            cache.images, cache.labels, cache.classes, 1.0 / 255.0, "imagefolder", info=cache.info
        )
    if isinstance(spec, TorchvisionDataset):
        (x, y, names, scale), (xt, yt, _, _) = _load_torchvision(spec)
        origin = f"torchvision:{spec.name}"
        return _Source(x, y, names, scale, origin, test=_Source(xt, yt, names, scale, origin))
    # An upload id: only the service can resolve it to a file.
    raise DatasetError(
        f"dataset source {getattr(spec, 'source', spec)!r} names a service upload; outside the "
        "service use source 'npz' or 'imagefolder' with a path"
    )


def _work(workdir: Path | None) -> Path:
    if workdir is None:  # outside a job (tests, notebooks): a folder of the process's own
        workdir = Path(tempfile.mkdtemp(prefix="distillery-data-"))
    workdir.mkdir(parents=True, exist_ok=True)  # a fresh job's working folder is not there yet
    return workdir


def _validate(src: _Source) -> tuple[np.ndarray, int]:
    """int64 labels and the class count, after the checks `validate_arrays` makes on whole
    arrays (x's values are checked in memory here; an .npz was checked streamed)."""
    check_layout(src.x.dtype, (len(src.x), *src.x.sample_shape), src.y.shape)
    if isinstance(src.x, ArraySource) and src.x.dtype.kind == "f":
        as_float32(src.x.array)  # refuses NaN and infinity
    y = labels_as_int(src.y)
    num_classes = check_label_range(int(y.min()), int(y.max()), len(y), src.names)
    check_class_counts(np.bincount(y, minlength=num_classes))
    return y, num_classes


def _subsample(n: int, k: int | None, seed: int) -> np.ndarray:
    """Positions of a seeded sample of k of n rows (all of them, in order, without k)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:k]


def _split_indices(spec: Any, src: _Source, y: np.ndarray, seed: int):
    """Index lists (train, test, val-or-None) into the source (test: into its own test split
    when it has one): the same seeded stratified splits as splitting the arrays themselves."""
    if src.test is not None:
        n_test = (
            None if spec.max_samples is None else max(int(spec.max_samples * spec.test_fraction), 1)
        )
        train = _subsample(len(y), spec.max_samples, seed)
        held = _subsample(len(src.test.y), n_test, seed)
    else:
        rows = _subsample(len(y), spec.max_samples, seed)
        train, held, _, _ = _split(rows, y[rows], spec.test_fraction, seed)
    val = None
    if spec.val_fraction > 0:
        try:
            train, val, _, _ = _split(train, y[train], spec.val_fraction, seed + 1)
        except DatasetError:  # too few samples to hold some out: models are not compared
            val = None
    return train, held, val


# How an ImageFolder image becomes the model's input, step by step: imagecache.decode_image
# does exactly this, and the model card repeats it so users can feed raw images.
IMAGE_PREPROCESS = (
    "open with PIL, convert('RGB'), resize the whole image (aspect ratio not kept) to "
    "width x height = size with Image.Resampling.BILINEAR (PIL's, antialiased when shrinking)"
)


def input_contract(
    spec: Any, x: Samples, scale: float, mean: list, std: list, names: list[str], origin: str
) -> dict[str, Any]:
    """What a user needs to feed the exported model: layout, dtype, scaling, mean/std and
    class names; for image archives also how to decode and resize an image."""
    per = "channel" if x.ndim == 4 else "feature"
    contract: dict[str, Any] = {
        "name": "input",
        "shape": ["batch", *x.shape[1:]],
        "dtype": "float32",
        "layout": "NCHW" if x.ndim == 4 else "ND",
        "scale": scale,
        "mean": mean,
        "std": std,
        "preprocess": f"x = (raw * scale - mean) / std, with mean/std per {per}",
        "output": {"name": "logits", "shape": ["batch", len(names)]},
        "class_names": names,
        "source": origin,
    }
    if isinstance(spec, ImageFolderDataset):
        steps = IMAGE_PREPROCESS + (", then convert('L')" if spec.grayscale else "")
        contract["image"] = {
            "size": [spec.image_size, spec.image_size],  # height, width
            "resize": "bilinear",
            "antialias": True,
            "keep_aspect_ratio": False,
            "channels": "L" if spec.grayscale else "RGB",  # RGB: red first, never BGR
            "pixel_range": [0, 255],
        }
        contract["preprocess"] = (
            f"{steps}; take the pixels as uint8 in C,H,W order ("
            + ("one channel" if spec.grayscale else "R, G, B")
            + f"); then {contract['preprocess']}"
        )
    return contract


def load_dataset(
    spec: Any,
    seed: int,
    workdir: Path | None = None,
    *,
    settings: DataSettings | None = None,
    progress: Progress | None = None,
) -> DataBundle:
    """Load any dataset spec into validated, split, normalised splits read per batch (held as
    tensors when the whole dataset fits `settings.resident_bytes`). `progress(fraction,
    message)` hears about extraction, decoding and the statistics pass."""
    settings = settings or DataSettings()
    started = time.perf_counter()
    src = _source(spec, workdir, settings, _part(progress, 0.0, 0.9))
    y, num_classes = _validate(src)
    test_src, y_test = src, y
    if src.test is not None:
        test_src = src.test
        y_test, _ = _validate(src.test)
    train, held, val = _split_indices(spec, src, y, seed)
    t0 = time.perf_counter()
    stats = _part(progress, 0.9, 1.0)
    norm = streaming_stats(
        src.x, train, src.scale, lambda f: stats(f, "normalisation statistics") if stats else None
    )
    splits = [Split(src.x, train, norm, settings), Split(test_src.x, held, norm, settings)]
    if val is not None:
        splits.append(Split(src.x, val, norm, settings))
    resident = sum(s.nbytes for s in splits) <= settings.resident_bytes
    xs = [s[:] if resident else s for s in splits]
    names = src.names or [str(i) for i in range(num_classes)]
    info = {
        **src.info,
        "samples": len(y) + (len(y_test) if src.test is not None else 0),
        "bytes": _source_bytes(src),
        "read_per_batch": not resident,
        "stats_seconds": round(time.perf_counter() - t0, 3),
        "seconds": round(time.perf_counter() - started, 3),
    }
    mean, std = norm.mean.tolist(), norm.std.tolist()
    return DataBundle(
        x_train=xs[0],
        y_train=torch.from_numpy(y[train]),
        x_test=xs[1],
        y_test=torch.from_numpy(y_test[held]),
        num_classes=num_classes,
        class_names=names,
        input_contract=input_contract(spec, splits[0], src.scale, mean, std, names, src.origin),
        x_val=xs[2] if val is not None else None,
        y_val=torch.from_numpy(y[val]) if val is not None else None,
        info=info,
        settings=settings,
    )


def data_dir(out: Path) -> Path:
    """Where a job's data is decoded (or converted) to: a `.work/tmp…` folder, which the
    service's job folder never sends to a bucket (it is rebuilt, not shipped, on another host)."""
    return out / ".work" / "tmp-data"


def _part(progress: Progress | None, lo: float, hi: float) -> Progress | None:
    """`progress` for a part of the data stage that spans lo..hi of it."""
    if progress is None:
        return None
    return lambda f, message: progress(lo + (hi - lo) * f, message)


def _source_bytes(src: _Source) -> int:
    """The dataset's bytes as its rows are stored (uint8 images: one byte a pixel)."""
    n = len(src.x) + (len(src.test.x) if src.test is not None else 0)
    return n * int(np.prod(src.x.sample_shape)) * src.x.dtype.itemsize


# Shapes known without loading anything: lets the API check a spec before queueing it.
_KNOWN_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "builtin:digits": ((1, 8, 8), 10),
    "torchvision:CIFAR10": ((3, 32, 32), 10),
    "torchvision:MNIST": ((1, 28, 28), 10),
    "torchvision:FashionMNIST": ((1, 28, 28), 10),
}


def known_shape(spec: Any) -> tuple[tuple[int, ...], int] | None:
    """(input_shape, num_classes) of a built-in or torchvision dataset, else None."""
    return _KNOWN_SHAPES.get(f"{spec.source}:{getattr(spec, 'name', '')}")
