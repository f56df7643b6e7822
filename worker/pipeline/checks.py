"""Checks that a dataset's arrays (whole, or streamed in chunks) make a dataset: numeric x of
N,C,H,W or N,D, one integer label per sample covering 0..K-1. Shared by the worker's loaders
(data.py) and the API's streamed description of an upload (npz.py), so both refuse alike."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from worker.pipeline.errors import DatasetError

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
