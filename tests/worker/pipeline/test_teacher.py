"""Uploaded teachers: TorchScript, ONNX, safetensors+arch load; pickles never do."""

import pickle
import zipfile

import pytest
import torch

from worker.pipeline import teacher as teacher_stage
from worker.pipeline.errors import DatasetIncompatible, ModelLoadError
from worker.pipeline.export import export_onnx, export_safetensors, export_torchscript
from worker.pipeline.spec import OnnxTeacher, SafetensorsTeacher, TorchScriptTeacher, TrainedTeacher
from worker.pipeline.train import accuracy


class _Exploit:
    """Unpickling this would create a file: proof the code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def reference_accuracy(digits, trained_teacher):
    return accuracy(trained_teacher.module, digits.x_test, digits.y_test, torch.device("cpu"))


def test_trains_a_teacher_from_the_spec(digits, ctx):
    result = teacher_stage.run(TrainedTeacher(arch="cnn_tiny", epochs=3), digits, ctx, seed=0)
    assert result.module is not None and result.metrics["torch_accuracy"] > 0.3
    assert result.metrics["params"] > 0


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors"])
def test_uploaded_teacher_gives_the_same_predictions(
    fmt, digits, trained_teacher, reference_accuracy, tmp_path, ctx
):
    model = trained_teacher.module
    if fmt == "torchscript":
        spec = TorchScriptTeacher(
            source="torchscript",
            path=str(export_torchscript(model, digits.x_test, tmp_path / "t.pt")),
        )
    elif fmt == "onnx":
        spec = OnnxTeacher(
            source="onnx", path=str(export_onnx(model, digits.x_test, tmp_path / "t.onnx"))
        )
    else:
        path = export_safetensors(
            model, tmp_path / "t.safetensors", arch="cnn_small", arch_kwargs={}
        )
        spec = SafetensorsTeacher(source="safetensors", path=str(path), arch="cnn_small")
    result = teacher_stage.run(spec, digits, ctx, seed=0)
    assert result.metrics["torch_accuracy"] == pytest.approx(reference_accuracy, abs=1e-6)
    assert (result.module is None) == (fmt == "onnx")


def _pickles(tmp_path, marker):
    """A code-running pickle in each accepted format's clothing."""
    payload = pickle.dumps(_Exploit(marker))
    raw = tmp_path / "model.pt"
    raw.write_bytes(payload)
    saved = tmp_path / "saved.pt"  # torch.save output: a zip whose data.pkl runs the exploit
    torch.save({"w": _Exploit(marker)}, saved)
    onnx_named = tmp_path / "model.onnx"
    onnx_named.write_bytes(payload)
    st_named = tmp_path / "model.safetensors"
    st_named.write_bytes(payload)
    fake_ts = tmp_path / "fake_ts.pt"  # a zip with TorchScript-looking names around a pickle
    with zipfile.ZipFile(fake_ts, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    return {"torchscript": [raw, saved, fake_ts], "onnx": [onnx_named], "safetensors": [st_named]}


def test_pickled_uploads_are_refused_and_never_run(digits, tmp_path, ctx):
    marker = tmp_path / "pwned"
    for fmt, paths in _pickles(tmp_path, marker).items():
        for path in paths:
            if fmt == "torchscript":
                spec = TorchScriptTeacher(source="torchscript", path=str(path))
            elif fmt == "onnx":
                spec = OnnxTeacher(source="onnx", path=str(path))
            else:
                spec = SafetensorsTeacher(source="safetensors", path=str(path), arch="cnn_small")
            with pytest.raises(ModelLoadError) as err:
                teacher_stage.run(spec, digits, ctx, seed=0)
            assert path.name in str(err.value)
            assert not marker.exists(), f"{fmt} upload {path.name} executed pickled code"


def test_torch_save_checkpoint_gets_a_message_that_says_what_to_do(
    digits, tmp_path, trained_teacher, ctx
):
    path = tmp_path / "ckpt.pt"
    torch.save(trained_teacher.module.state_dict(), path)
    with pytest.raises(
        ModelLoadError, match="torch.save pickle.*torch.jit.save.*ONNX or safetensors"
    ):
        teacher_stage.run(
            TorchScriptTeacher(source="torchscript", path=str(path)), digits, ctx, seed=0
        )


def test_corrupt_uploads_are_refused_clearly(digits, trained_teacher, tmp_path, ctx):
    good = export_onnx(trained_teacher.module, digits.x_test, tmp_path / "good.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cut.onnx: not a loadable ONNX model"):
        teacher_stage.run(OnnxTeacher(source="onnx", path=str(cut)), digits, ctx, seed=0)
    ts = export_torchscript(trained_teacher.module, digits.x_test, tmp_path / "good.pt")
    broken = tmp_path / "broken.pt"
    data = bytearray(ts.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\0" * 64
    broken.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="broken.pt"):
        teacher_stage.run(
            TorchScriptTeacher(source="torchscript", path=str(broken)), digits, ctx, seed=0
        )


def test_teacher_that_does_not_fit_the_dataset_is_named(digits, tmp_path, ctx):
    from safetensors.torch import save_file

    from worker.pipeline.archs import build_model

    other = build_model("cnn_small", (3, 32, 32), 4)
    path = tmp_path / "o.safetensors"  # plain weights, as another tool would write them
    save_file(other.state_dict(), str(path))
    with pytest.raises(DatasetIncompatible, match="do not fit arch 'cnn_small'"):
        teacher_stage.run(
            SafetensorsTeacher(source="safetensors", path=str(path), arch="cnn_small"),
            digits,
            ctx,
            seed=0,
        )
    wrong_classes = build_model("cnn_small", digits.input_shape, 4)
    onnx_path = export_onnx(wrong_classes, digits.x_test, tmp_path / "w.onnx")
    with pytest.raises(DatasetIncompatible, match=r"outputs \[2, 4\]; the dataset has 10 classes"):
        teacher_stage.run(OnnxTeacher(source="onnx", path=str(onnx_path)), digits, ctx, seed=0)
