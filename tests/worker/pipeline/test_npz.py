"""Streaming .npz inspection: every chunk is checked, not just the first.

Chunks are made tiny here so that a few dozen rows span many of them; the malformed-array
messages themselves are tested through the API (tests/reliability/test_bad_input.py).
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from numpy.lib import format as npy

from worker.pipeline import npz
from worker.pipeline.errors import DatasetError
from worker.pipeline.npz import inspect_npz


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(npz, "CHUNK_BYTES", 64)


def _write(path, **arrays) -> None:
    np.savez_compressed(path, **arrays)


def _rows(n: int = 60) -> np.ndarray:
    return np.random.default_rng(0).random((n, 3), dtype=np.float32)


def test_a_dataset_spanning_many_chunks_is_described(tmp_path):
    y = np.r_[np.arange(58) % 2, 2, 2]  # class 2 only in the last chunk
    _write(tmp_path / "d.npz", x=_rows(), y=y, classes=np.array(["a", "b", "c"]))
    summary = inspect_npz(tmp_path / "d.npz", max_total_bytes=1 << 20)
    assert summary.num_samples == 60 and summary.input_shape == [3]
    assert summary.num_classes == 3 and summary.counts == [29, 29, 2]
    assert summary.class_names == ["a", "b", "c"]


TWO_NAMES = {"classes": np.array(["a", "b"])}


@pytest.mark.parametrize(
    "x,y,extra,message",
    [
        (np.r_[_rows(59), [[0, 0, np.nan]]], np.arange(60) % 2, {}, "x contains NaN or infinite"),
        (_rows(), np.r_[np.arange(59) % 2, -1], {}, "label -1 is out of range"),
        (_rows(), np.r_[np.arange(59) % 2, 7], TWO_NAMES, "label 7 is out of range for 2 classes"),
        (_rows(), np.r_[np.arange(59) % 2, 0.5], {}, "non-integer values"),
        (_rows(), np.r_[np.arange(58) % 3, 1, 1] * 2, {}, r"classes \[1, 3\] have no samples"),
    ],
    ids=["NaN in the last row", "negative last label", "top label last", "float last", "gaps"],
)
def test_a_problem_in_the_last_chunk_is_found(tmp_path, x, y, extra, message):
    _write(tmp_path / "d.npz", x=x, y=y, **extra)
    with pytest.raises(DatasetError, match=message):
        inspect_npz(tmp_path / "d.npz", max_total_bytes=1 << 20)


def test_fortran_order_arrays_are_read_by_value(tmp_path):
    _write(tmp_path / "d.npz", x=np.asfortranarray(_rows()), y=np.arange(60) % 2)
    assert inspect_npz(tmp_path / "d.npz", max_total_bytes=1 << 20).input_shape == [3]


def test_a_member_shorter_than_its_header_says_is_unreadable(tmp_path):
    """A header may claim any shape: the data is read as it comes, never allocated from it."""
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as zf:
        for name, descr, shape, data in (
            ("x.npy", "<f4", (10**9, 3), _rows()),
            ("y.npy", "<i8", (10**9,), np.arange(60) % 2),
        ):
            with zf.open(name, "w") as f:
                header = {"descr": descr, "fortran_order": False, "shape": shape}
                npy.write_array_header_1_0(f, header)
                f.write(data.tobytes())
    with pytest.raises(DatasetError) as e:
        inspect_npz(tmp_path / "d.npz", max_total_bytes=1 << 20)
    assert e.value.message == (
        "d.npz: not a readable .npz file (EOF: reading array data of x.npy, "
        "expected 12000000000 bytes got 720)"
    )
