"""Data read per batch from disk: the same numbers as the in-memory path, memory sized by a
budget, and clear errors for a corrupt image or a full disk."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.factories import write_archive
from worker.pipeline import distill, imagecache
from worker.pipeline.archs import build_model
from worker.pipeline.context import StageContext
from worker.pipeline.data import load_dataset
from worker.pipeline.errors import DatasetError
from worker.pipeline.evaluate import onnx_activation_bytes, onnx_logits
from worker.pipeline.export import export_onnx
from worker.pipeline.limits import DataSettings
from worker.pipeline.losses import CrossEntropyOnly
from worker.pipeline.samples import RecordFile, Split, batch_size_for, traced
from worker.pipeline.spec import BuiltinDataset, DistillSpec, ImageFolderDataset, NpzDataset
from worker.pipeline.teacher import TeacherResult
from worker.pipeline.train import TrainConfig, accuracy, fit, predict_logits

STREAM = DataSettings(workers=1, resident_bytes=0)  # every split read per batch, in a worker


def test_record_file_reads_rows_in_the_order_asked_with_repeats(tmp_path):
    rows = np.arange(10 * 6, dtype=np.int16).reshape(10, 2, 3)
    path = tmp_path / "rows.bin"
    path.write_bytes(b"HEADER" + rows.tobytes())
    f = RecordFile(path, offset=6, dtype=np.int16, sample_shape=(2, 3), n=10)

    asked = np.array([7, 2, 3, 4, 2, 9, 0])
    np.testing.assert_array_equal(f.read(asked), rows[asked])
    assert f.read(np.array([], np.int64)).shape == (0, 2, 3)


def test_a_streamed_split_holds_the_same_values_as_the_in_memory_one():
    spec = BuiltinDataset(max_samples=600)
    memory = load_dataset(spec, seed=0)
    streamed = load_dataset(spec, seed=0, settings=STREAM)

    assert isinstance(memory.x_train, torch.Tensor) and isinstance(streamed.x_train, Split)
    assert streamed.summary()["read_per_batch"] and not memory.summary()["read_per_batch"]
    for name in ("x_train", "x_test", "x_val"):
        np.testing.assert_array_equal(getattr(streamed, name)[:], getattr(memory, name))
    for name in ("y_train", "y_test", "y_val"):
        assert torch.equal(getattr(streamed, name), getattr(memory, name))


def test_statistics_from_the_streaming_pass_match_numpy_on_the_whole_training_split():
    from sklearn.datasets import load_digits

    b = load_dataset(BuiltinDataset(val_fraction=0), seed=0, settings=STREAM)
    raw = load_digits().images[:, None].astype(np.float64) / 16.0
    train = raw[b.x_train.indices]
    assert b.input_contract["mean"][0] == pytest.approx(train.mean(), abs=1e-6)
    assert b.input_contract["std"][0] == pytest.approx(train.std(), abs=1e-6)


def _train(data, epochs: int = 6):
    torch.manual_seed(0)
    model = build_model("cnn_small", data.input_shape, data.num_classes)
    fit(
        model,
        data.x_train,
        data.y_train,
        cfg=TrainConfig(epochs=epochs, lr=3e-3, weight_decay=0.0, batch_size=64, seed=0),
        loss_fn=CrossEntropyOnly(),
        ctx=StageContext(),
    )
    return model, accuracy(model, data.x_test, data.y_test, torch.device("cpu"))


def test_a_streamed_job_trains_to_the_same_model_and_accuracy_as_the_in_memory_path():
    spec = BuiltinDataset(max_samples=600)
    memory_model, memory_acc = _train(load_dataset(spec, seed=0))
    streamed_model, streamed_acc = _train(load_dataset(spec, seed=0, settings=STREAM))

    assert memory_acc > 0.85  # it learned: the comparison is between models that work
    assert streamed_acc == memory_acc
    for (name, a), b in zip(
        memory_model.state_dict().items(), streamed_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_npz_x_is_read_in_place_when_stored_and_converted_once_when_compressed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (80, 3, 6, 6), dtype=np.uint8)
    y = np.arange(80) % 4
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "small.npz", x=x, y=y)

    got = {}
    for name in ("plain", "small"):
        spec = NpzDataset(source="npz", path=str(tmp_path / f"{name}.npz"), val_fraction=0)
        b = load_dataset(spec, seed=0, workdir=tmp_path / f"work-{name}", settings=STREAM)
        got[name] = b
        src = b.x_train.source
        # The rows are the file's own, in its order: compare with numpy's reading of it.
        np.testing.assert_array_equal(src.read(np.arange(80)), x)
    assert got["plain"].info["x_in_place"] and got["plain"].x_train.source.path.name == "plain.npz"
    assert not got["small"].info["x_in_place"]
    assert got["small"].x_train.source.path.parent == tmp_path / "work-small"
    np.testing.assert_array_equal(got["plain"].x_test[:], got["small"].x_test[:])


# --- batches sized by memory ------------------------------------------------------------------


def test_prediction_batches_come_from_the_budget_and_the_activation_size():
    wide = build_model("cnn_small", (3, 224, 224), 10).eval()
    mlp = build_model("mlp", (64,), 10).eval()
    with torch.no_grad():
        _, conv_bytes = traced(wide, torch.zeros(1, 3, 224, 224))
        _, mlp_bytes = traced(mlp, torch.zeros(1, 64))
    budget = 256 << 20
    # A 224-px conv net keeps megabytes a sample: far from a 1,024-image batch...
    assert conv_bytes > 224 * 224 * 3 * 4 * 4
    assert batch_size_for(conv_bytes, budget, 10_000) < 64
    # ... while a small MLP still gets the largest batch.
    assert batch_size_for(mlp_bytes, budget, 10_000) == 1024
    assert batch_size_for(mlp_bytes, budget, 300) == 300


def test_predictions_in_budget_sized_batches_match_one_batch():
    data = load_dataset(BuiltinDataset(max_samples=300), seed=0, settings=STREAM)
    model = build_model("cnn_small", data.input_shape, data.num_classes).eval()
    cpu = torch.device("cpu")
    whole = predict_logits(model, data.x_test[:], cpu, batch_size=len(data.x_test))
    tiny_budget = DataSettings(memory_budget_bytes=1)  # one sample a batch
    torch.testing.assert_close(predict_logits(model, data.x_test, cpu, settings=tiny_budget), whole)


def test_onnx_evaluation_sizes_its_batches_from_the_graph(tmp_path):
    data = load_dataset(BuiltinDataset(max_samples=300), seed=0, settings=STREAM)
    model = build_model("cnn_small", data.input_shape, data.num_classes).eval()
    path = export_onnx(model, data.x_test, tmp_path / "m.onnx")
    per_sample = onnx_activation_bytes(path)
    assert per_sample > 64 * 4  # more than its input: the graph's inner tensors count
    ref = predict_logits(model, data.x_test, torch.device("cpu")).numpy()
    np.testing.assert_allclose(onnx_logits(path, data.x_test), ref, atol=1e-4)


def test_cached_teacher_logits_live_on_disk_and_match_the_teacher(tmp_path):
    data = load_dataset(BuiltinDataset(max_samples=300), seed=0, settings=STREAM)
    teacher = build_model("cnn_small", data.input_shape, data.num_classes).eval()
    ctx = StageContext(checkpoint_dir=tmp_path / "ckpt")
    signal = distill.teacher_signal(
        TeacherResult(teacher, teacher, None, {}), data, DistillSpec(), ctx
    )
    on_disk = tmp_path / "ckpt" / "teacher_logits.npy"
    assert on_disk.exists() and signal.logits is not None
    torch.testing.assert_close(signal.logits, predict_logits(teacher, data.x_train[:], ctx.device))
    np.testing.assert_array_equal(np.load(on_disk), signal.logits.numpy())


# --- ImageFolder: decoded once, read per batch, bad input named ------------------------------


def _jpeg(rgb, size=20, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(rgb) + rng.normal(0, 20, (size, size, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _jpegs(per_class: int) -> dict[str, bytes]:
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 220)}
    return {
        f"{cls}/{i:04d}.jpg": _jpeg(rgb, seed=i) for cls, rgb in colours.items()
        for i in range(per_class)
    }  # fmt: skip


def _folder(path: Path) -> ImageFolderDataset:
    return ImageFolderDataset(source="imagefolder", path=str(path), image_size=12, val_fraction=0)


def test_imagefolder_is_decoded_once_into_a_cache_a_second_load_reuses(tmp_path):
    archive = write_archive(tmp_path / "jpegs.zip", _jpegs(20))
    seen = []
    first = load_dataset(
        _folder(archive),
        seed=0,
        workdir=tmp_path / "w",
        settings=STREAM,
        progress=lambda f, m: seen.append((f, m)),
    )
    again = load_dataset(_folder(archive), seed=0, workdir=tmp_path / "w", settings=STREAM)

    assert first.info["images"] == 60 and first.info["decode_images_per_second"] > 0
    assert first.info["bytes"] == 60 * 3 * 12 * 12 and not first.info["reused"]
    assert again.info["reused"]
    np.testing.assert_array_equal(first.x_test[:], again.x_test[:])
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert any("decoded 60/60 images" in m for _, m in seen)
    assert not any(p.name == "extracted" for p in (tmp_path / "w").rglob("*"))


def test_a_corrupt_jpeg_among_many_is_named_and_fails_as_a_dataset_error(tmp_path):
    members = _jpegs(40)
    good = members["green/0017.jpg"]
    members["green/0017.jpg"] = good[: len(good) // 3]  # cut short mid-scan
    archive = write_archive(tmp_path / "jpegs.tar.gz", members)
    settings = DataSettings(workers=2, resident_bytes=0)

    with pytest.raises(DatasetError, match=r"jpegs\.tar\.gz: cannot decode green/0017\.jpg \("):
        load_dataset(_folder(archive), seed=0, workdir=tmp_path / "w", settings=settings)
    assert list((tmp_path / "w").iterdir()) == []  # nothing left behind


def test_a_full_disk_fails_the_decoding_with_a_message_that_says_so(tmp_path, monkeypatch):
    archive = write_archive(tmp_path / "jpegs.zip", _jpegs(10))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        imagecache.shutil, "disk_usage", lambda p: usage._replace(free=1000)
    )  # 1 kB free: 30 images of 12 x 12 x 3 need 13 kB

    with pytest.raises(DatasetError, match=r"jpegs\.zip: the worker's disk is full: .* needs"):
        load_dataset(_folder(archive), seed=0, workdir=tmp_path / "w", settings=STREAM)
    assert list((tmp_path / "w").iterdir()) == []


def test_a_disk_that_fills_while_writing_the_cache_says_so(tmp_path, monkeypatch):
    import errno

    archive = write_archive(tmp_path / "jpegs.zip", _jpegs(10))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imagecache, "_write", full)
    with pytest.raises(DatasetError, match=r"jpegs\.zip: the worker's disk is full"):
        load_dataset(_folder(archive), seed=0, workdir=tmp_path / "w", settings=STREAM)


def test_an_imagefolder_job_trains_from_the_cache_in_worker_processes(tmp_path):
    archive = write_archive(tmp_path / "jpegs.zip", _jpegs(30))
    data = load_dataset(_folder(archive), seed=0, workdir=tmp_path / "w", settings=STREAM)
    model = build_model("cnn_tiny", data.input_shape, data.num_classes, widths=[8, 16])
    fit(
        model,
        data.x_train,
        data.y_train,
        cfg=TrainConfig(epochs=4, lr=1e-2, weight_decay=0.0, batch_size=16),
        loss_fn=CrossEntropyOnly(),
        ctx=StageContext(),
    )
    # Three colours: chance is 1/3; a model fed the right rows with their labels gets them.
    assert accuracy(model, data.x_test, data.y_test, torch.device("cpu")) >= 0.9


def test_channels_last_is_only_asked_for_conv_nets_on_cuda():
    from worker.pipeline.samples import wants_channels_last

    conv, mlp = build_model("cnn_small", (3, 16, 16), 3), nn.Sequential(nn.Linear(4, 2))
    x4, x2 = torch.zeros(2, 3, 16, 16), torch.zeros(2, 4)
    assert wants_channels_last(conv, x4, torch.device("cuda"))
    assert not wants_channels_last(conv, x4, torch.device("cpu"))
    assert not wants_channels_last(mlp, x2, torch.device("cuda"))
