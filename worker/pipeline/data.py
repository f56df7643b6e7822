"""Datasets: load, validate, split (seeded, stratified) and normalise into in-memory tensors.

Every source ends as a `DataBundle`; the bundle's `input_contract` is what a user needs to
feed the exported model (layout, dtype, scaling, per-channel mean/std, class names).
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from worker.pipeline.archives import MAX_MEMBERS, MAX_TOTAL_BYTES, safe_extract
from worker.pipeline.errors import DatasetError
from worker.pipeline.registry import Registry
from worker.pipeline.spec import (
    BuiltinDataset,
    ImageFolderDataset,
    NpzDataset,
    TorchvisionDataset,
)

# A decoded image costs width x height x 3 bytes before it is resized to the spec's few dozen
# pixels, and a small PNG of a huge blank canvas decodes to gigabytes (Pillow refuses only
# beyond ~179 M pixels, and merely warns beyond ~89 M). 8192 x 8192 (200 MB decoded) still
# takes a 48-megapixel photo.
MAX_IMAGE_PIXELS = 8192 * 8192

RawData = tuple[np.ndarray, np.ndarray, list[str] | None, float]  # x, y, class names, scale

BUILTIN_DATASETS: Registry[Callable[[], RawData]] = Registry("builtin dataset")
TORCHVISION_DATASETS: Registry[str] = Registry("torchvision dataset")
for _name in ("CIFAR10", "MNIST", "FashionMNIST"):
    TORCHVISION_DATASETS.add(_name, _name)


@dataclass
class DataBundle:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: list[str]
    input_contract: dict[str, Any] = field(default_factory=dict)
    # Held out of the training split to choose between models (never used for training).
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def val(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The validation split as (x, y), or None when the spec holds none out."""
        if self.x_val is None or self.y_val is None:
            return None
        return self.x_val, self.y_val

    @property
    def is_image(self) -> bool:
        return self.x_train.ndim == 4

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        """A seeded subset of the training split for int8 calibration."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.x_train), generator=g)[: min(n, len(self.x_train))]
        return self.x_train[idx]

    def summary(self) -> dict[str, Any]:
        return {
            "num_train": len(self.x_train),
            "num_test": len(self.x_test),
            "num_val": 0 if self.x_val is None else len(self.x_val),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
        }


@BUILTIN_DATASETS.register("digits")
def _digits() -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None, :, :]  # N,1,8,8 with values 0..16
    return x, d.target.astype(np.int64), [str(c) for c in d.target_names], 1.0 / 16.0


# --- validation ----------------------------------------------------------------------------


# Checked piecewise, so that whole arrays (a job's worker) and arrays streamed in chunks
# (the API describing an upload, npz.py) are refused with the same messages.

# A classifier head past this is not what a .npz upload holds, and counting samples per
# class allocates one slot per class.
MAX_CLASSES = 100_000
NOT_FINITE = "x contains NaN or infinite values"


def check_layout(x_dtype: np.dtype, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> None:
    """What the arrays' dtype and shapes alone say: x numeric, N,C,H,W or N,D; one label each."""
    if x_dtype.kind not in "biuf":
        raise DatasetError(f"x has dtype {x_dtype}; expected a numeric array (float or int)")
    if len(x_shape) not in (2, 4):
        raise DatasetError(
            f"x has shape {tuple(x_shape)}; expected images (N,C,H,W) or feature rows (N,D)"
        )
    if len(y_shape) != 1:
        raise DatasetError(f"y has shape {tuple(y_shape)}; expected one label per sample (N,)")
    if x_shape[0] != y_shape[0]:
        raise DatasetError(f"x has {x_shape[0]} samples but y has {y_shape[0]} labels")
    if x_shape[0] == 0:
        raise DatasetError("the dataset is empty")
    if 0 in x_shape[1:]:
        raise DatasetError(f"x has shape {tuple(x_shape)}: each sample is empty")
    if len(x_shape) == 4 and not (1 <= x_shape[1] <= 16):
        raise DatasetError(
            f"x has {x_shape[1]} channels (shape {tuple(x_shape)}); images must be N,C,H,W "
            "with C first (1..16 channels)"
        )


def as_float32(x: np.ndarray) -> np.ndarray:
    """x (or a chunk of it) as float32, refusing NaN and infinity."""
    with np.errstate(over="ignore"):  # a value past float32 becomes inf, refused just below
        x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DatasetError(NOT_FINITE)
    return x


def check_label_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in "iubf":
        raise DatasetError(f"y has dtype {dtype}; expected integer class labels")


def labels_as_int(y: np.ndarray) -> np.ndarray:
    """y (or a chunk of it) as int64, refusing non-integer values."""
    check_label_dtype(y.dtype)
    if y.dtype.kind == "f" and (not np.all(np.isfinite(y)) or not np.all(y == np.round(y))):
        raise DatasetError("y must hold integer class labels; found non-integer values")
    return y.astype(np.int64)


def check_label_range(low: int, high: int, n: int, class_names: list[str] | None) -> int:
    """The class count implied by labels `low`..`high` of `n` samples (or by the names)."""
    if low < 0:
        raise DatasetError(f"label {low} is out of range: labels must be 0..K-1")
    num_classes = len(class_names) if class_names else high + 1
    if high >= num_classes:
        raise DatasetError(
            f"label {high} is out of range for {num_classes} classes (labels 0..{num_classes - 1})"
        )
    if num_classes > n:
        # Checked before counting: bincount would allocate one slot per class, and a single
        # huge label (2**40) would ask for terabytes.
        raise DatasetError(
            f"{num_classes} classes but only {n} samples: labels must cover 0..K-1, "
            "each class with samples"
        )
    if num_classes > MAX_CLASSES:
        raise DatasetError(f"{num_classes} classes; at most {MAX_CLASSES} are supported")
    if num_classes < 2:
        raise DatasetError("the dataset needs at least 2 classes")
    return num_classes


def check_class_counts(counts: np.ndarray) -> None:
    empty = [int(c) for c in np.flatnonzero(counts == 0)]
    if empty:
        raise DatasetError(
            f"classes {empty} have no samples (labels must cover 0..{len(counts) - 1})"
        )


def validate_arrays(
    x: np.ndarray, y: np.ndarray, class_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Check shapes, dtypes, finiteness and labels; return float32 x, int64 y, num_classes."""
    check_layout(x.dtype, x.shape, y.shape)
    x = as_float32(x)
    y = labels_as_int(y)
    num_classes = check_label_range(int(y.min()), int(y.max()), len(y), class_names)
    check_class_counts(np.bincount(y, minlength=num_classes))
    return x, y, num_classes


# --- sources -------------------------------------------------------------------------------


def check_npz_file(path: Path, *, max_total_bytes: int) -> None:
    """A zip whose members' declared sizes stay within `max_total_bytes`. Those sizes bound
    what is read (zipfile stops there and checks the CRC), so this caps memory before a
    compressed array expands."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # .npz files are zip archives
            raise DatasetError(
                f"{path.name}: not a readable .npz file (expected a zip archive of .npy arrays)"
            )
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DatasetError(f"{path.name}: not a readable .npz file ({e})") from None
    if declared > max_total_bytes:
        raise DatasetError(
            f"{path.name}: its arrays expand to {declared} bytes; the cap is {max_total_bytes}"
        )


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


def _class_folders(root: Path) -> Path:
    """The folder whose subfolders are the classes, once archivers' metadata is gone."""
    # Archivers leave metadata folders (macOS: __MACOSX, ._* files) that are not classes.
    for junk in [p for p in root.rglob("*") if p.name.startswith((".", "__MACOSX"))]:
        if junk.is_dir():
            shutil.rmtree(junk, ignore_errors=True)
        elif junk.exists():
            junk.unlink()
    # Tolerate archives that wrap the class folders in one top-level folder.
    entries = list(root.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if p.is_dir()]
        if inner and all(any(q.is_file() for q in d.iterdir()) for d in inner):
            return entries[0]
    return root


def load_imagefolder(
    path: Path,
    image_size: int,
    grayscale: bool,
    workdir: Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> RawData:
    from PIL import Image
    from torchvision import datasets

    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    root = safe_extract(
        path, workdir / "imagefolder", max_members=max_members, max_total_bytes=max_total_bytes
    )
    root = _class_folders(root)

    def loader(p: str) -> np.ndarray:
        # Exactly what IMAGE_PREPROCESS (and so every model card) tells users to do with their
        # own images: PIL decodes, converts to RGB, resizes the whole image bilinearly
        # (antialiased when shrinking), then converts to grayscale when asked.
        with Image.open(p) as img:  # reads the header only: the size is known before decoding
            if img.width * img.height > max_image_pixels:
                raise ValueError(
                    f"{img.width}x{img.height} pixels is over the limit of {max_image_pixels} "
                    "pixels an image; scale the images down before uploading"
                )
            img = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            if grayscale:
                img = img.convert("L")
            arr = np.asarray(img, dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # to C,H,W

    try:
        ds = datasets.ImageFolder(str(root), loader=loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"{path.name}: not an ImageFolder archive ({e})") from None
    xs, ys = [], []
    for i in range(len(ds)):
        try:
            img, label = ds[i]
        except Exception as e:
            member = Path(ds.samples[i][0]).relative_to(root)
            raise DatasetError(f"{path.name}: cannot decode {member} ({e})") from None
        xs.append(img)
        ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64), list(ds.classes), 1.0 / 255.0


def _load_torchvision(spec: TorchvisionDataset) -> tuple[RawData, RawData]:
    from torchvision import datasets

    cls = getattr(datasets, TORCHVISION_DATASETS.get(spec.name))
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=spec.root, train=train, download=spec.download)
        except RuntimeError as e:
            hint = (
                ""
                if spec.download
                else " (pre-fill the data root, or set dataset.download: true where downloads are allowed)"
            )
            raise DatasetError(f"{spec.name} not found under {spec.root}{hint}: {e}") from None
        except (ValueError, AssertionError, KeyError, TypeError, OSError) as e:
            raise DatasetError(
                f"{spec.name} files under {spec.root} are unreadable ({type(e).__name__}: {e})"
            ) from None
        x = np.asarray(ds.data)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # to N,C,H,W
        splits.append((x, np.asarray(ds.targets), list(ds.classes), 1.0 / 255.0))
    return splits[0], splits[1]


# --- assembly ------------------------------------------------------------------------------


def _subsample(x: np.ndarray, y: np.ndarray, n: int | None, seed: int):
    if n is None or n >= len(x):
        return x, y
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[idx], y[idx]


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


def _normalise(x_train: np.ndarray, x_test: np.ndarray, scale: float):
    """Scale to ~[0,1], then standardise per channel (images) or per feature (rows)."""
    x_train, x_test = x_train * scale, x_test * scale
    axes = (0, 2, 3) if x_train.ndim == 4 else (0,)
    mean = x_train.mean(axis=axes)
    std = x_train.std(axis=axes)
    std = np.where(std < 1e-6, 1.0, std).astype(np.float32)
    shape = (1, -1, 1, 1) if x_train.ndim == 4 else (1, -1)
    x_train = (x_train - mean.reshape(shape)) / std.reshape(shape)
    x_test = (x_test - mean.reshape(shape)) / std.reshape(shape)
    return x_train, x_test, mean.tolist(), std.tolist()


def _read(spec: Any, workdir: Path | None) -> tuple[RawData, RawData | None, str]:
    """The raw arrays of a dataset spec, the source's own test split if it ships one, and
    where they came from."""
    if isinstance(spec, BuiltinDataset):
        return BUILTIN_DATASETS.get(spec.name)(), None, f"builtin:{spec.name}"
    if isinstance(spec, NpzDataset):
        return load_npz(Path(spec.path)), None, "npz"
    if isinstance(spec, ImageFolderDataset):
        if workdir is not None:  # a fresh job's working folder does not exist yet
            workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            raw = load_imagefolder(Path(spec.path), spec.image_size, spec.grayscale, Path(tmp))
        return raw, None, "imagefolder"
    if isinstance(spec, TorchvisionDataset):
        train, test = _load_torchvision(spec)
        return train, test, f"torchvision:{spec.name}"
    # An upload id: only the service can resolve it to a file.
    raise DatasetError(
        f"dataset source {getattr(spec, 'source', spec)!r} names a service upload; outside the "
        "service use source 'npz' or 'imagefolder' with a path"
    )


# How an ImageFolder image becomes the model's input, step by step: the loader above does
# exactly this, and the model card repeats it so users can feed raw images.
IMAGE_PREPROCESS = (
    "open with PIL, convert('RGB'), resize the whole image (aspect ratio not kept) to "
    "width x height = size with Image.Resampling.BILINEAR (PIL's, antialiased when shrinking)"
)


def input_contract(
    spec: Any, x: np.ndarray, scale: float, mean: list, std: list, names: list[str], origin: str
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


def _split_all(spec: Any, raw: RawData, test: RawData | None, seed: int):
    """(train, test, val-or-None) array pairs: the source's own test split when it has one,
    else a seeded stratified split; val is held out of train when `val_fraction` > 0."""
    x, y, names, _ = raw
    x, y, num_classes = validate_arrays(x, y, names)
    if test is not None:
        xt, yt, _ = validate_arrays(test[0], test[1], names)
        n_test = (
            None if spec.max_samples is None else max(int(spec.max_samples * spec.test_fraction), 1)
        )
        train = _subsample(x, y, spec.max_samples, seed)
        held = _subsample(xt, yt, n_test, seed)
    else:
        x, y = _subsample(x, y, spec.max_samples, seed)
        x_train, x_test, y_train, y_test = _split(x, y, spec.test_fraction, seed)
        train, held = (x_train, y_train), (x_test, y_test)
    val = None
    if spec.val_fraction > 0:
        try:
            x_train, x_val, y_train, y_val = _split(*train, spec.val_fraction, seed + 1)
            train, val = (x_train, y_train), (x_val, y_val)
        except DatasetError:  # too few samples to hold some out: models are not compared
            val = None
    return train, held, val, num_classes


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def load_dataset(spec: Any, seed: int, workdir: Path | None = None) -> DataBundle:
    """Load any dataset spec into a validated, split, normalised `DataBundle`."""
    raw, test, origin = _read(spec, workdir)
    scale = raw[3]
    (x_train, y_train), (x_test, y_test), val, num_classes = _split_all(spec, raw, test, seed)
    x_train, x_test, mean, std = _normalise(x_train, x_test, scale)
    x_val = y_val = None
    if val is not None:
        x_val, y_val = val
        shape = (1, -1, 1, 1) if x_val.ndim == 4 else (1, -1)
        x_val = (x_val * scale - np.asarray(mean).reshape(shape)) / np.asarray(std).reshape(shape)
    names = raw[2] or [str(i) for i in range(num_classes)]
    return DataBundle(
        x_train=_tensor(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=_tensor(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=num_classes,
        class_names=names,
        input_contract=input_contract(spec, x_train, scale, mean, std, names, origin),
        x_val=None if x_val is None else _tensor(x_val),
        y_val=None if y_val is None else torch.from_numpy(y_val),
    )


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
