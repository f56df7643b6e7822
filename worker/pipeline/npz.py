"""Describe an uploaded .npz without holding its arrays in memory.

`np.load` expands every array whole: a 1.5 MB `savez_compressed` file of zeros is 1.6 GB
once read. The API only needs to know that the arrays make a dataset, and its shape, so it
reads each member's .npy header from the zip and streams the data in bounded chunks through
the same checks as `checks.validate_arrays` (same messages). Workers do the same, then read x
per batch: an uncompressed (`np.savez`) member in place, a compressed one converted once into
the job's folder (`open_npz`).
"""

from __future__ import annotations

import errno
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy

from worker.pipeline.checks import (
    as_float32,
    check_class_counts,
    check_label_dtype,
    check_label_range,
    check_layout,
    check_npz_file,
    labels_as_int,
)
from worker.pipeline.errors import DatasetError
from worker.pipeline.samples import RecordFile

CHUNK_BYTES = 4 << 20  # per read of a member: memory is a few of these, whatever the array
MAX_NAMES_BYTES = 16 << 20  # the `classes` array is read whole


@dataclass(frozen=True)
class NpzSummary:
    num_samples: int
    num_classes: int
    input_shape: list[int]
    class_names: list[str] | None
    counts: list[int]  # samples per class


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def inspect_npz(path: Path, *, max_total_bytes: int) -> NpzSummary:
    """Validate x, y and optional class names of a .npz as `load_npz` + `validate_arrays`
    would, reading at most a few CHUNK_BYTES at a time. Raises DatasetError."""
    check_npz_file(path, max_total_bytes=max_total_bytes)
    try:
        with zipfile.ZipFile(path) as zf:
            return _inspect(zf, path.name)
    except DatasetError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # A damaged header, a failed CRC, a member cut short: as np.load would fail.
        raise DatasetError(f"{path.name}: not a readable .npz file ({e})") from None


def _inspect(zf: zipfile.ZipFile, name: str) -> NpzSummary:
    members = _headers(zf, name)
    x, y = members["x"], members["y"]
    # The headers first: a wrong dtype or shape is refused before any data is inflated.
    check_layout(x.dtype, x.shape, y.shape)
    check_label_dtype(y.dtype)
    names = _class_names(zf, members["classes"], name) if "classes" in members else None
    for chunk in _chunks(zf, x):
        as_float32(chunk)
    low, high = None, None
    for chunk in _chunks(zf, y):
        labels = labels_as_int(chunk)
        if labels.size:
            low = int(labels.min()) if low is None else min(low, int(labels.min()))
            high = int(labels.max()) if high is None else max(high, int(labels.max()))
    assert low is not None and high is not None  # check_layout refused an empty y
    num_classes = check_label_range(low, high, y.shape[0], names)
    counts = np.zeros(num_classes, np.int64)
    for chunk in _chunks(zf, y):  # a second pass: the class count was not known in the first
        counts += np.bincount(labels_as_int(chunk), minlength=num_classes)
    check_class_counts(counts)
    return NpzSummary(
        num_samples=y.shape[0],
        num_classes=num_classes,
        input_shape=list(x.shape[1:]),
        class_names=names,
        counts=[int(c) for c in counts],
    )


def _headers(zf: zipfile.ZipFile, name: str) -> dict[str, _Member]:
    # np.load's naming: a member "x" or else "x.npy" is the array "x".
    infos = {i.filename: i for i in zf.infolist()}
    files = [n.removesuffix(".npy") for n in infos]
    missing = {"x", "y"} - set(files)
    if missing:
        raise DatasetError(f"{name}: missing array(s) {sorted(missing)}; it holds {sorted(files)}")
    out: dict[str, _Member] = {}
    raw = []
    for key in ("x", "y", "classes"):
        info = infos.get(key) or infos.get(f"{key}.npy")
        if info is None:
            continue
        with zf.open(info) as f:
            header = _read_header(f)
        if header is None:
            raw.append(key)
            continue
        dtype, shape, fortran = header
        if dtype.hasobject:
            raise DatasetError(
                f"{name}: holds object arrays, which would need unpickling; save plain numeric arrays"
            )
        out[key] = _Member(info, dtype, shape, fortran)
    if raw:
        # np.load hands back the bytes of a member that is not a .npy array.
        raise DatasetError(
            f"{name}: {', '.join(raw)} must be .npy arrays (as np.savez writes them)"
        )
    return out


def _read_header(f: IO[bytes]) -> tuple[np.dtype, tuple[int, ...], bool] | None:
    """(dtype, shape, Fortran order) of a .npy stream, or None when it is not one."""
    if f.read(len(npy.MAGIC_PREFIX)) != npy.MAGIC_PREFIX:
        return None
    major = f.read(2)[:1]
    # Version 3.0 differs from 2.0 only in encoding the header as UTF-8 (for non-Latin-1
    # field names of structured dtypes, which are refused as non-numeric anyway).
    if major == b"\x01":
        shape, fortran_order, dtype = npy.read_array_header_1_0(f)
    elif major in (b"\x02", b"\x03"):
        shape, fortran_order, dtype = npy.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {major!r}")
    # Element order does not matter to any check here (each looks at values, not positions);
    # `open_npz` reads rows, and converts a Fortran-order x.
    return dtype, tuple(shape), bool(fortran_order)


def _chunks(zf: zipfile.ZipFile, member: _Member) -> Iterator[np.ndarray]:
    """The member's elements, CHUNK_BYTES at a time (a flat view of each chunk)."""
    itemsize = member.dtype.itemsize
    step = max(CHUNK_BYTES // itemsize, 1) * itemsize
    left = member.nbytes
    with zf.open(member.info) as f:
        _read_header(f)
        while left > 0:
            data = f.read(min(step, left))
            if len(data) < min(step, left):
                raise ValueError(
                    f"EOF: reading array data of {member.info.filename}, expected "
                    f"{member.nbytes} bytes got {member.nbytes - left + len(data)}"
                )
            left -= len(data)
            yield np.frombuffer(data, dtype=member.dtype)


def _class_names(zf: zipfile.ZipFile, member: _Member, name: str) -> list[str]:
    if member.nbytes > MAX_NAMES_BYTES:
        raise DatasetError(
            f"{name}: its classes array holds {member.nbytes} bytes; at most {MAX_NAMES_BYTES} "
            "are read"
        )
    with zf.open(member.info) as f:
        names = npy.read_array(f, allow_pickle=False)
    return [str(c) for c in names]


# --- a job's x, read per batch ----------------------------------------------------------------


@dataclass
class NpzData:
    x: RecordFile
    y: np.ndarray  # int64 labels (8 bytes a sample: held in memory)
    class_names: list[str] | None
    scale: float
    info: dict[str, Any]


def open_npz(path: Path, workdir: Path, *, max_total_bytes: int) -> NpzData:
    """Validate the .npz as the API does (streamed), then give x as records read per batch:
    an uncompressed member where it lies in the file, a compressed (or Fortran-order) one
    written once as raw rows into `workdir`. Raises DatasetError."""
    summary = inspect_npz(path, max_total_bytes=max_total_bytes)
    try:
        with zipfile.ZipFile(path) as zf:
            members = _headers(zf, path.name)
            x = members["x"]
            y = np.concatenate([labels_as_int(c) for c in _chunks(zf, members["y"])])
            in_place = x.info.compress_type == zipfile.ZIP_STORED and not x.fortran
            records = _in_place(zf, path, x) if in_place else _converted(zf, x, workdir)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DatasetError(f"{path.name}: the worker's disk is full (converting x)") from None
        raise DatasetError(f"{path.name}: not a readable .npz file ({e})") from None
    info = {"file_bytes": path.stat().st_size, "x_bytes": x.nbytes, "x_in_place": in_place}
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    return NpzData(records, y, summary.class_names, scale, info)


def _in_place(zf: zipfile.ZipFile, path: Path, x: _Member) -> RecordFile:
    """x's rows where they lie: after the member's local header and its .npy header."""
    with open(path, "rb") as f:
        f.seek(x.info.header_offset)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    with zf.open(x.info) as member:
        _read_header(member)
        npy_header = member.tell()
    offset = x.info.header_offset + 30 + name_len + extra_len + npy_header
    return RecordFile(path, offset=offset, dtype=x.dtype, sample_shape=x.shape[1:], n=x.shape[0])


def _converted(zf: zipfile.ZipFile, x: _Member, workdir: Path) -> RecordFile:
    workdir.mkdir(parents=True, exist_ok=True)
    dest = workdir / "npz-x.raw"
    with open(dest, "wb") as out:
        if x.fortran:  # rare (np.savez of a transposed array): rows need the whole array
            with zf.open(x.info) as f:
                out.write(np.ascontiguousarray(npy.read_array(f, allow_pickle=False)).tobytes())
        else:
            for chunk in _chunks(zf, x):
                out.write(chunk.tobytes())
    return RecordFile(dest, offset=0, dtype=x.dtype, sample_shape=x.shape[1:], n=x.shape[0])
