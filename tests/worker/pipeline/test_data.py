"""load_dataset: every source ends as a validated, seeded, stratified, normalised DataBundle.

Bad data must fail as a DatasetError whose message names the problem, because that message
is what the user reads in the job's error.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from tests.factories import write_archive
from worker.pipeline.context import StageContext
from worker.pipeline.data import DataBundle, load_dataset, validate_arrays
from worker.pipeline.errors import DatasetError
from worker.pipeline.imagecache import build_image_cache, inspect_imagefolder
from worker.pipeline.limits import DataSettings
from worker.pipeline.losses import CrossEntropyOnly
from worker.pipeline.samples import DatasetSource, Split
from worker.pipeline.spec import (
    BuiltinDataset,
    ImageFolderDataset,
    NpzDataset,
    TorchvisionDataset,
)
from worker.pipeline.train import TrainConfig, fit


def _raw(bundle: DataBundle, x: torch.Tensor) -> np.ndarray:
    """Undo the input contract: raw = (x * std + mean) / scale."""
    c = bundle.input_contract
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    mean = np.asarray(c["mean"], dtype=np.float64).reshape(shape)
    std = np.asarray(c["std"], dtype=np.float64).reshape(shape)
    return (x.numpy().astype(np.float64) * std + mean) / c["scale"]


def _save_npz(path: Path, **arrays) -> NpzDataset:
    np.savez(path, **arrays)
    return NpzDataset(val_fraction=0, source="npz", path=str(path))


# --- builtin digits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_dataset(BuiltinDataset(val_fraction=0), seed=0)


def test_digits_are_8x8_single_channel_images_of_ten_classes(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8)
    assert digits.x_test.shape[1:] == (1, 8, 8)
    assert digits.x_train.dtype == torch.float32
    assert digits.num_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    assert set(digits.y_train.tolist()) == set(range(10))
    assert digits.is_image


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_digits_split_holds_out_test_fraction_stratified_by_class(fraction):
    b = load_dataset(BuiltinDataset(val_fraction=0, test_fraction=fraction), seed=0)
    total = len(b.x_train) + len(b.x_test)
    all_y = torch.cat([b.y_train, b.y_test])

    assert total == 1797
    assert len(b.x_test) == round(total * fraction)
    per_class = torch.bincount(all_y, minlength=10).numpy()
    held_out = torch.bincount(b.y_test, minlength=10).numpy()
    # Stratified: every class is held out in proportion, give or take one sample.
    assert np.all(np.abs(held_out - per_class * fraction) <= 1)


def test_digits_split_is_seeded(digits):
    again = load_dataset(BuiltinDataset(val_fraction=0), seed=0)
    other = load_dataset(BuiltinDataset(val_fraction=0), seed=1)

    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(digits, name), getattr(again, name)), name
    assert not torch.equal(digits.y_test, other.y_test)
    assert not torch.equal(digits.x_train, other.x_train)


def test_digits_train_split_is_standardised(digits):
    x = digits.x_train
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std(unbiased=False)) - 1.0) < 1e-4


def test_digits_max_samples_subsamples_before_splitting():
    b = load_dataset(BuiltinDataset(val_fraction=0, max_samples=200, test_fraction=0.25), seed=0)

    assert len(b.x_train) == 150
    assert len(b.x_test) == 50


def test_digits_input_contract_tells_how_to_feed_the_model(digits):
    c = digits.input_contract

    assert c["scale"] == pytest.approx(1 / 16)
    assert c["shape"] == ["batch", 1, 8, 8]
    assert c["layout"] == "NCHW"
    assert c["dtype"] == "float32"
    assert len(c["mean"]) == len(c["std"]) == 1
    assert c["std"][0] > 0
    assert c["output"]["shape"] == ["batch", 10]
    # Following the contract on raw 0..16 pixels gives back values in the raw range.
    raw = _raw(digits, digits.x_test)
    assert raw.min() > -1e-3 and raw.max() < 16 + 1e-3
    np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)  # digits pixels are integers


def test_calibration_is_a_seeded_subset_of_the_training_split(digits):
    calib = digits.calibration(50, seed=3)

    assert calib.shape == (50, 1, 8, 8)
    same = calib.flatten(1)[:, None, :] == digits.x_train.flatten(1)[None, :, :]
    assert same.all(dim=2).any(dim=1).all()  # every calibration sample is a training sample
    assert torch.equal(calib, digits.calibration(50, seed=3))
    assert not torch.equal(calib, digits.calibration(50, seed=4))
    assert len(digits.calibration(10**6, seed=0)) == len(digits.x_train)


# --- npz -----------------------------------------------------------------------------------


def _balanced_labels(n: int, k: int) -> np.ndarray:
    return np.arange(n) % k


def test_npz_uint8_images_load_with_scale_1_over_255_and_labels_follow_their_samples(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 3, 4, 4), dtype=np.uint8)
    y = _balanced_labels(40, 2)

    b = load_dataset(_save_npz(tmp_path / "d.npz", x=x, y=y), seed=0)

    assert b.input_contract["scale"] == pytest.approx(1 / 255)
    assert b.x_train.shape == (32, 3, 4, 4) and b.x_test.shape == (8, 3, 4, 4)
    assert b.input_contract["shape"] == ["batch", 3, 4, 4]
    # Each test sample, mapped back through the contract, is one of the raw samples,
    # and carries that sample's label.
    raw = _raw(b, b.x_test).reshape(8, -1)
    dist = np.abs(raw[:, None, :] - x.reshape(40, -1)[None].astype(np.float64)).max(axis=2)
    match = dist.argmin(axis=1)
    assert dist.min(axis=1).max() < 1e-2
    assert b.y_test.tolist() == y[match].tolist()


def test_npz_float_images_keep_scale_1_and_each_channel_is_standardised(tmp_path):
    rng = np.random.default_rng(0)
    x = np.stack(
        [
            rng.normal(5, 2, size=(60, 6, 6)),
            rng.normal(-100, 30, size=(60, 6, 6)),
            rng.uniform(0, 1, size=(60, 6, 6)),
        ],
        axis=1,
    ).astype(np.float32)

    b = load_dataset(_save_npz(tmp_path / "d.npz", x=x, y=_balanced_labels(60, 3)), seed=0)

    assert b.input_contract["scale"] == 1.0
    assert len(b.input_contract["mean"]) == 3
    assert b.input_contract["mean"][1] == pytest.approx(-100, abs=5)
    per_channel_mean = b.x_train.mean(dim=(0, 2, 3))
    per_channel_std = b.x_train.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(per_channel_mean, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel_std, torch.ones(3), atol=1e-4, rtol=0)


def test_npz_feature_rows_load_as_nd_and_the_contract_recovers_the_raw_rows(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7)) * np.arange(1, 8)
    x[:, 0] = np.arange(50)  # a row id, so each test row can be traced back
    y = _balanced_labels(50, 2)

    b = load_dataset(_save_npz(tmp_path / "d.npz", x=x, y=y), seed=0)

    assert b.x_train.shape == (40, 7) and b.x_test.shape == (10, 7)
    assert not b.is_image
    assert b.input_contract["layout"] == "ND"
    assert b.input_contract["shape"] == ["batch", 7]
    assert len(b.input_contract["mean"]) == 7
    raw = _raw(b, b.x_test)
    ids = np.round(raw[:, 0]).astype(int)
    np.testing.assert_allclose(raw, x[ids], rtol=1e-4, atol=1e-4)
    assert b.y_test.tolist() == y[ids].tolist()


def test_npz_max_samples_draws_a_seeded_sample_from_the_whole_file(tmp_path):
    # Rows sorted by class: taking the first rows would miss class 1 entirely.
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    np.savez(tmp_path / "sorted.npz", x=x, y=np.repeat([0, 1], 50))
    spec = NpzDataset(
        val_fraction=0, source="npz", path=str(tmp_path / "sorted.npz"), max_samples=40
    )

    a, again, other = (load_dataset(spec, seed=s) for s in (0, 0, 1))

    assert len(a.x_train) + len(a.x_test) == 40
    assert set(a.y_train.tolist()) == {0, 1}
    assert torch.equal(a.x_train, again.x_train)

    def drawn(b: DataBundle) -> set[int]:
        return set(np.round(_raw(b, torch.cat([b.x_train, b.x_test]))[:, 0]).astype(int).tolist())

    assert drawn(a) == drawn(again)
    assert drawn(a) != drawn(other)  # another seed draws other rows, not just another split


def test_npz_classes_array_names_the_classes(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    spec = _save_npz(
        tmp_path / "d.npz", x=x, y=_balanced_labels(30, 3), classes=np.array(["cat", "dog", "eel"])
    )

    b = load_dataset(spec, seed=0)

    assert b.class_names == ["cat", "dog", "eel"]
    assert b.num_classes == 3


def test_npz_without_classes_names_classes_by_index(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)

    b = load_dataset(_save_npz(tmp_path / "d.npz", x=x, y=_balanced_labels(30, 3)), seed=0)

    assert b.class_names == ["0", "1", "2"]


class _Tripwire:
    """Unpickling this creates `marker`: proof that the loader ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_npz_with_an_object_array_is_refused_without_unpickling_it(tmp_path):
    marker = tmp_path / "unpickled"
    x = np.empty(20, dtype=object)
    x[:] = [_Tripwire(marker) for _ in range(20)]
    path = tmp_path / "evil.npz"
    np.savez(path, x=x, y=_balanced_labels(20, 2))  # savez pickles object arrays

    with pytest.raises(DatasetError, match=r"object arrays.*unpickling"):
        load_dataset(NpzDataset(val_fraction=0, source="npz", path=str(path)), seed=0)

    assert not marker.exists()


def _images(n: int = 20) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 1, 4, 4)).astype(np.float32)


def _with_nan() -> dict:
    x = _images()
    x[3, 0, 1, 1] = np.nan
    return {"x": x, "y": _balanced_labels(20, 2)}


BAD_NPZ = {
    "missing y": ({"x": _images()}, r"missing array\(s\) \['y'\]"),
    "3-D images without a channel axis": (
        {"x": _images()[:, 0], "y": _balanced_labels(20, 2)},
        r"shape \(20, 4, 4\).*\(N,C,H,W\)",
    ),
    "channels last": (
        {"x": np.zeros((20, 32, 32, 3), np.uint8), "y": _balanced_labels(20, 2)},
        r"x has 32 channels.*C first",
    ),
    "x and y lengths differ": (
        {"x": _images(20), "y": _balanced_labels(19, 2)},
        r"x has 20 samples but y has 19 labels",
    ),
    "NaN in x": (_with_nan(), r"NaN"),
    "negative label": (
        {"x": _images(), "y": np.r_[_balanced_labels(19, 2), -1]},
        r"label -1 is out of range",
    ),
    "float labels that are not integers": (
        {"x": _images(), "y": _balanced_labels(20, 2) + 0.5},
        r"non-integer",
    ),
    "label beyond the named classes": (
        {"x": _images(), "y": _balanced_labels(20, 3), "classes": np.array(["a", "b"])},
        r"label 2 is out of range for 2 classes",
    ),
    "a class with no samples": (
        {"x": _images(), "y": _balanced_labels(20, 2) * 2},  # labels 0 and 2 only
        r"classes \[1\] have no samples",
    ),
    "a class with a single sample": (
        {"x": _images(), "y": np.r_[np.zeros(19, np.int64), 1]},
        r"class 1 has 1 sample",
    ),
    "string x": (
        {"x": np.array(["a", "b"] * 10), "y": _balanced_labels(20, 2)},
        r"x has dtype <U1; expected a numeric array",
    ),
    "string y": (
        {"x": _images(), "y": np.array(["cat", "dog"] * 10)},
        r"y has dtype <U3; expected integer class labels",
    ),
}


@pytest.mark.parametrize("arrays,message", BAD_NPZ.values(), ids=BAD_NPZ.keys())
def test_bad_npz_is_refused_with_a_message_naming_the_problem(tmp_path, arrays, message):
    spec = _save_npz(tmp_path / "bad.npz", **arrays)

    with pytest.raises(DatasetError, match=message):
        load_dataset(spec, seed=0)


def test_truncated_npz_file_is_refused_as_unreadable(tmp_path):
    x = np.random.default_rng(0).normal(size=(200, 8))
    _save_npz(tmp_path / "full.npz", x=x, y=_balanced_labels(200, 2))
    path = tmp_path / "cut.npz"
    path.write_bytes((tmp_path / "full.npz").read_bytes()[:3000])

    with pytest.raises(DatasetError, match=r"cut\.npz: not a readable \.npz file"):
        load_dataset(NpzDataset(val_fraction=0, source="npz", path=str(path)), seed=0)


def test_random_bytes_npz_file_is_refused(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(2048))

    with pytest.raises(DatasetError, match=r"noise\.npz"):
        load_dataset(NpzDataset(val_fraction=0, source="npz", path=str(path)), seed=0)


def test_random_bytes_npz_file_is_called_unreadable_not_an_object_array(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(2048))

    with pytest.raises(DatasetError, match=r"not a readable \.npz file"):
        load_dataset(NpzDataset(val_fraction=0, source="npz", path=str(path)), seed=0)


def test_missing_npz_file_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"no such file"):
        load_dataset(
            NpzDataset(val_fraction=0, source="npz", path=str(tmp_path / "nope.npz")), seed=0
        )


# --- validate_arrays -----------------------------------------------------------------------


def test_validate_arrays_returns_float32_x_int64_y_and_the_class_count():
    x = np.arange(24, dtype=np.int16).reshape(6, 4)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)

    vx, vy, k = validate_arrays(x, y)

    assert vx.dtype == np.float32 and vy.dtype == np.int64 and k == 3
    np.testing.assert_array_equal(vx, x)
    np.testing.assert_array_equal(vy, y)


def test_validate_arrays_accepts_whole_float_labels():
    _, y, k = validate_arrays(np.zeros((4, 2)), np.array([0.0, 1.0, 1.0, 0.0]))

    assert y.tolist() == [0, 1, 1, 0] and k == 2


@pytest.mark.parametrize(
    "x,y,message",
    [
        (np.zeros((4, 2)), np.zeros((4, 1), np.int64), r"one label per sample"),
        (np.full((4, 2), np.inf), np.array([0, 1, 0, 1]), r"infinite"),
        (np.zeros((4, 2)), np.zeros(4, np.int64), r"at least 2 classes"),
        (np.zeros((0, 2)), np.zeros(0, np.int64), r"empty"),
        (np.zeros((4, 2)), np.array([0, 1, np.nan, 1]), r"non-integer"),
    ],
    ids=["2-D y", "inf in x", "one class", "empty", "NaN label"],
)
def test_validate_arrays_refuses(x, y, message):
    with pytest.raises(DatasetError, match=message):
        validate_arrays(x, y)


# --- image folders -------------------------------------------------------------------------

# Folder names are given out of order on purpose: classes are named in sorted order.
COLOURS = {"zebra": (0, 0, 255), "apple": (255, 0, 0)}


def _png(colour: tuple[int, int, int], size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _image_members(prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}{cls}/{i}.png": _png(colour) for cls, colour in COLOURS.items() for i in range(6)
    }


def _folder_spec(path: Path, **kw) -> ImageFolderDataset:
    return ImageFolderDataset(
        val_fraction=0, source="imagefolder", path=str(path), image_size=16, **kw
    )


@pytest.mark.parametrize("name", ["pets.zip", "pets.tar.gz"])
def test_imagefolder_archive_loads_resized_rgb_images_labelled_by_sorted_folder(tmp_path, name):
    archive = write_archive(tmp_path / name, _image_members())

    b = load_dataset(_folder_spec(archive), seed=0, workdir=tmp_path)

    assert b.class_names == ["apple", "zebra"]
    assert b.x_train.shape == (10, 3, 16, 16) and b.x_test.shape == (2, 3, 16, 16)
    assert b.input_contract["scale"] == pytest.approx(1 / 255)
    # apple (label 0) images are red and zebra (label 1) images are blue.
    x = np.concatenate([_raw(b, b.x_train), _raw(b, b.x_test)])
    y = torch.cat([b.y_train, b.y_test]).numpy()
    red, blue = x[:, 0].mean(axis=(1, 2)), x[:, 2].mean(axis=(1, 2))
    np.testing.assert_allclose(red[y == 0], 255, atol=0.5)
    np.testing.assert_allclose(blue[y == 0], 0, atol=0.5)
    np.testing.assert_allclose(blue[y == 1], 255, atol=0.5)
    np.testing.assert_allclose(red[y == 1], 0, atol=0.5)


def test_imagefolder_grayscale_gives_one_channel(tmp_path):
    archive = write_archive(tmp_path / "pets.zip", _image_members())

    b = load_dataset(_folder_spec(archive, grayscale=True), seed=0, workdir=tmp_path)

    assert b.x_train.shape[1:] == (1, 16, 16)
    assert b.input_contract["shape"] == ["batch", 1, 16, 16]


@pytest.mark.parametrize("name", ["pets.zip", "pets.tar.gz"])
def test_imagefolder_archive_wrapping_class_folders_in_one_top_folder_loads(tmp_path, name):
    archive = write_archive(tmp_path / name, _image_members(prefix="my-dataset/"))

    b = load_dataset(_folder_spec(archive), seed=0, workdir=tmp_path)

    assert b.class_names == ["apple", "zebra"]
    assert len(b.x_train) + len(b.x_test) == 12


def test_imagefolder_with_an_undecodable_image_names_the_file(tmp_path):
    members = _image_members()
    members["apple/broken.png"] = b"not a png at all"
    archive = write_archive(tmp_path / "pets.zip", members)

    with pytest.raises(DatasetError, match=r"cannot decode .*broken\.png"):
        load_dataset(_folder_spec(archive), seed=0, workdir=tmp_path)


def test_imagefolder_refuses_an_image_too_large_to_decode_and_names_it(tmp_path):
    from worker.pipeline import data

    assert data.MAX_IMAGE_PIXELS == 8192 * 8192  # a 48-megapixel photo still loads
    # The check reads the header before decoding: shown here with the limit scaled down to
    # 64 x 64, so the test does not have to decode a 200 MB canvas to prove it is refused.
    members = _image_members()
    members["zebra/big.png"] = _png((0, 0, 0), size=65)
    archive = write_archive(tmp_path / "pets.zip", members)

    refused = r"cannot decode zebra/big\.png \(65x65 pixels is over"
    with pytest.raises(DatasetError, match=refused):  # the API's upload check
        inspect_imagefolder(archive, tmp_path / "small", max_image_pixels=64 * 64)
    with pytest.raises(DatasetError, match=refused):  # a job's decoding
        build_image_cache(
            archive, 16, False, tmp_path / "job", settings=DataSettings(workers=0),
            max_image_pixels=64 * 64,
        )  # fmt: skip
    # The limit is the only reason: with the limit at its size, the same archive loads.
    folder = inspect_imagefolder(archive, tmp_path / "again", max_image_pixels=65 * 65)
    assert folder.classes == ["apple", "zebra"] and len(folder.labels) == len(members)
    cache = build_image_cache(
        archive, 16, False, tmp_path / "job", settings=DataSettings(workers=0),
        max_image_pixels=65 * 65,
    )  # fmt: skip
    assert len(cache.labels) == len(members)


def test_the_upload_check_reads_headers_and_leaves_a_cut_image_to_the_decoder(tmp_path):
    members = _image_members()
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    whole = buf.getvalue()
    members["zebra/cut.png"] = whole[: len(whole) // 2]  # its header is whole, its pixels not
    members["apple/junk.png"] = b"not an image at all"
    archive = write_archive(tmp_path / "pets.zip", members)

    # No image at all: refused from what its first bytes say.
    with pytest.raises(DatasetError, match=r"pets\.zip: cannot decode apple/junk\.png \("):
        inspect_imagefolder(archive, tmp_path / "a")
    del members["apple/junk.png"]
    archive = write_archive(tmp_path / "pets.zip", members)
    # A cut image passes the header check; decoding it fails, naming it.
    folder = inspect_imagefolder(archive, tmp_path / "b")
    assert len(folder.labels) == len(members)
    with pytest.raises(DatasetError, match=r"pets\.zip: cannot decode zebra/cut\.png \("):
        build_image_cache(archive, 16, False, tmp_path / "c", settings=DataSettings(workers=0))


def test_imagefolder_archive_with_traversal_is_refused(tmp_path):
    members = _image_members()
    members["../escaped.png"] = _png((0, 255, 0))
    archive = write_archive(tmp_path / "pets.zip", members)
    workdir = tmp_path / "work"
    workdir.mkdir()

    with pytest.raises(DatasetError, match=r"outside the archive"):
        load_dataset(_folder_spec(archive), seed=0, workdir=workdir)

    assert not any(p.name == "escaped.png" for p in tmp_path.rglob("*"))


def test_imagefolder_zip_made_on_macos_ignores_the_macosx_folder(tmp_path):
    members = _image_members()
    # Finder adds AppleDouble metadata files that share the images' names and extensions.
    members.update(
        {
            f"__MACOSX/{n.rsplit('/', 1)[0]}/._{n.rsplit('/', 1)[1]}": b"\0\5\26\7"
            for n in list(members)
        }
    )
    archive = write_archive(tmp_path / "Archive.zip", members)

    b = load_dataset(_folder_spec(archive), seed=0, workdir=tmp_path)

    assert b.class_names == ["apple", "zebra"]


# --- torchvision ---------------------------------------------------------------------------


def _idx_images(path: Path, values: list[int]) -> None:
    pixels = np.repeat(np.asarray(values, np.uint8), 28 * 28)
    path.write_bytes(struct.pack(">IIII", 2051, len(values), 28, 28) + pixels.tobytes())


def _idx_labels(path: Path, labels: list[int]) -> None:
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + bytes(labels))


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    """A pre-filled MNIST root: image i is filled with one grey level that identifies it."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_values, test_values = list(range(30)), list(range(100, 120))
    _idx_images(raw / "train-images-idx3-ubyte", train_values)
    _idx_labels(raw / "train-labels-idx1-ubyte", [v % 10 for v in train_values])
    _idx_images(raw / "t10k-images-idx3-ubyte", test_values)
    _idx_labels(raw / "t10k-labels-idx1-ubyte", [v % 10 for v in test_values])
    return tmp_path / "data"


def _mnist(root: Path, **kw) -> TorchvisionDataset:
    return TorchvisionDataset(
        val_fraction=0, source="torchvision", name="MNIST", root=str(root), **kw
    )


def test_torchvision_mnist_uses_the_official_test_split_from_a_local_root(mnist_root):
    b = load_dataset(_mnist(mnist_root), seed=0)

    assert b.x_train.shape == (30, 1, 28, 28)
    assert b.x_test.shape == (20, 1, 28, 28)
    assert b.num_classes == 10 and len(b.class_names) == 10
    assert b.input_contract["scale"] == pytest.approx(1 / 255)
    # The test set is exactly the t10k images (grey levels 100..119), with their labels.
    levels = np.round(_raw(b, b.x_test).mean(axis=(1, 2, 3))).astype(int)
    assert sorted(levels.tolist()) == list(range(100, 120))
    assert b.y_test.tolist() == [v % 10 for v in levels]
    train_levels = np.round(_raw(b, b.x_train).mean(axis=(1, 2, 3))).astype(int)
    assert sorted(train_levels.tolist()) == list(range(30))


def test_torchvision_max_samples_subsamples_both_official_splits(mnist_root):
    b = load_dataset(_mnist(mnist_root, max_samples=20, test_fraction=0.25), seed=0)

    assert len(b.x_train) == 20
    assert len(b.x_test) == 5


def test_torchvision_missing_root_without_download_says_to_enable_download(tmp_path):
    # The hint names the spec field to set, not torchvision's own keyword argument.
    with pytest.raises(DatasetError, match=r"MNIST not found.*dataset\.download: true"):
        load_dataset(_mnist(tmp_path / "nowhere", download=False), seed=0)


def test_torchvision_root_with_empty_files_is_refused_as_a_dataset_error(mnist_root):
    for f in (mnist_root / "MNIST" / "raw").iterdir():
        f.write_bytes(b"")  # what an interrupted download can leave behind

    with pytest.raises(DatasetError, match=r"MNIST"):
        load_dataset(_mnist(mnist_root), seed=0)


def test_torchvision_splits_are_index_lists_read_through_the_dataset_class(mnist_root):
    from torchvision import datasets

    stream = DataSettings(workers=1, resident_bytes=0)
    b = load_dataset(_mnist(mnist_root), seed=0, settings=stream)

    assert isinstance(b.x_train, Split) and isinstance(b.x_train.source, DatasetSource)
    assert isinstance(b.x_train.source.dataset, datasets.MNIST)
    # Positions into the class's own order: training image i is filled with grey level i.
    rows = b.x_train.indices
    levels = b.x_train.source.read(rows).mean(axis=(1, 2, 3))
    np.testing.assert_array_equal(levels, rows)
    np.testing.assert_allclose(_raw(b, b.x_train[:]).mean(axis=(1, 2, 3)), rows, atol=1e-3)
    # DataLoader workers started by spawn get a pickled copy: it reads the same rows.
    copy = pickle.loads(pickle.dumps(b.x_train.source))
    np.testing.assert_array_equal(copy.read(rows[:5]), b.x_train.source.read(rows[:5]))
    # A model trains on it through the loader's worker process.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    cfg = TrainConfig(epochs=1, lr=1e-3, weight_decay=0.0, batch_size=8, augment=True)
    parts = fit(
        model, b.x_train, b.y_train, cfg=cfg, loss_fn=CrossEntropyOnly(), ctx=StageContext()
    )
    assert np.isfinite(parts["loss"])


def _cifar_root(root: Path) -> Path:
    """CIFAR10's pickled batches: image i of a split has red i, green 100 + i, blue 200 - i."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(first: int, n: int) -> dict:
        values = np.arange(first, first + n)
        planes = np.stack([values, 100 + values, 200 - values], axis=1).astype(np.uint8)
        data = np.repeat(planes[:, :, None], 32 * 32, axis=2).reshape(n, 3 * 32 * 32)
        return {"data": data, "labels": [int(v) % 10 for v in values]}

    for i in range(1, 6):  # five training batches of 4, as the class reads them in order
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(4 * (i - 1), 4)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(50, 10)))
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def test_torchvision_cifar10_is_read_as_rgb_planes_through_its_class(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # The class checks its files against the official MD5s; these are written here.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    spec = TorchvisionDataset(
        val_fraction=0, source="torchvision", name="CIFAR10", root=str(_cifar_root(tmp_path))
    )
    b = load_dataset(spec, seed=0, settings=DataSettings(workers=0, resident_bytes=0))

    assert b.x_train.shape == (20, 3, 32, 32) and b.x_test.shape == (10, 3, 32, 32)
    assert b.class_names[:2] == ["plane", "car"]
    for split, first, labels in ((b.x_train, 0, b.y_train), (b.x_test, 50, b.y_test)):
        values = split.indices + first
        raw = split.source.read(split.indices).astype(int)
        np.testing.assert_array_equal(raw[:, 0, 5, 7], values)  # red plane first, C,H,W
        np.testing.assert_array_equal(raw[:, 1, 31, 0], 100 + values)
        np.testing.assert_array_equal(raw[:, 2, 0, 31], 200 - values)
        assert labels.tolist() == (values % 10).tolist()


# --- spec ----------------------------------------------------------------------------------


def test_unknown_builtin_dataset_fails_validation_listing_known_names():
    with pytest.raises(
        ValidationError, match=r"unknown builtin dataset 'imagenet'; known: .*digits"
    ):
        BuiltinDataset(val_fraction=0, name="imagenet")


def test_unknown_torchvision_dataset_fails_validation_listing_known_names():
    with pytest.raises(ValidationError, match=r"known: .*MNIST"):
        TorchvisionDataset(val_fraction=0, source="torchvision", name="SVHN")


def test_a_validation_split_is_held_out_of_training_stratified_and_normalised_alike():
    b = load_dataset(BuiltinDataset(val_fraction=0.1), seed=0)
    assert b.x_val is not None and len(b.x_val) == round(0.1 * (1797 - len(b.x_test)))
    assert len(b.x_train) + len(b.x_val) + len(b.x_test) == 1797
    assert set(b.y_val.tolist()) == set(range(10))  # stratified: every class is in it
    # Disjoint from the training rows, and on the training split's scale.
    train_rows = {tuple(r) for r in b.x_train.flatten(1).tolist()}
    assert not any(tuple(r) in train_rows for r in b.x_val.flatten(1).tolist())
    assert abs(float(b.x_val.mean())) < 0.2 and b.summary()["num_val"] == len(b.x_val)
    assert load_dataset(BuiltinDataset(val_fraction=0), seed=0).x_val is None
