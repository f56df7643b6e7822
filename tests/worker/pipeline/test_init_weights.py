"""Starting weights: checked from the safetensors header against the model the job builds
(head replaced when the class count differs, anything else that does not fit named), then
loaded into the student a job trains."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from worker.pipeline.archs import build_model
from worker.pipeline.errors import ModelLoadError, SpecError
from worker.pipeline.init_weights import file_header, head_of, load_init, plan_init
from worker.pipeline.limits import SpecLimits
from worker.pipeline.preflight import preflight
from worker.pipeline.spec import JobSpec

SHAPE = (3, 16, 16)
TINY = {"widths": [8, 16]}


def _weights(path, classes: int, **kwargs):
    torch.manual_seed(1)
    model = build_model("cnn_tiny", SHAPE, classes, **{**TINY, **kwargs})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def test_same_classes_load_every_tensor_and_keep_the_head(tmp_path):
    source = _weights(tmp_path / "w.safetensors", classes=3)
    torch.manual_seed(2)
    model = build_model("cnn_tiny", SHAPE, 3, **TINY)
    info = load_init(model, tmp_path / "w.safetensors", "student.init")
    assert info["head_replaced"] is False and info["replaced"] == []
    for name, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_another_class_count_replaces_the_head_only(tmp_path):
    source = _weights(tmp_path / "w.safetensors", classes=10)
    torch.manual_seed(2)
    model = build_model("cnn_tiny", SHAPE, 3, **TINY)
    fresh_head = model.classifier.weight.clone()
    info = load_init(model, tmp_path / "w.safetensors", "student.init")
    assert info["head_replaced"] is True
    assert sorted(info["replaced"]) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(model.classifier.weight, fresh_head)  # the job's own head, untouched
    conv = "features.0.0.weight"
    assert torch.equal(model.state_dict()[conv], source.state_dict()[conv])


def test_a_tensor_of_another_shape_is_named(tmp_path):
    _weights(tmp_path / "w.safetensors", classes=3, widths=[8, 32])
    model = build_model("cnn_tiny", SHAPE, 3, **TINY)
    with pytest.raises(SpecError) as e:
        plan_init(model, file_header(tmp_path / "w.safetensors"), "student.init")
    msg = e.value.message
    assert "features.1.0.weight [32, 8, 3, 3] in the file vs [16, 8, 3, 3] in the model" in msg
    # the head's input width differs too: not a class-count change, so not replaced silently
    assert "classifier.weight [3, 32]" in msg


def test_missing_and_unknown_tensors_are_named(tmp_path):
    torch.manual_seed(1)
    state = build_model("cnn_tiny", SHAPE, 3, **TINY).state_dict()
    state = {k: v.contiguous() for k, v in state.items() if not k.startswith("features.1.")}
    state["adapter.weight"] = torch.zeros(4, 4)
    save_file(state, str(tmp_path / "w.safetensors"))
    model = build_model("cnn_tiny", SHAPE, 3, **TINY)
    with pytest.raises(SpecError) as e:
        plan_init(model, file_header(tmp_path / "w.safetensors"), "student.init")
    assert "missing from the file: features.1.0.weight" in e.value.message
    assert "not in the model: adapter.weight" in e.value.message


def test_the_head_of_torchvision_archs_is_their_last_linear():
    with torch.device("meta"):
        assert head_of(build_model("resnet18", SHAPE, 3)) == "fc"
        assert head_of(build_model("mobilenet_v3_small", SHAPE, 3)) == "classifier.3"


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        file_header(bad)


def test_the_preflight_checks_a_local_init_before_anything_trains(tmp_path):
    _weights(tmp_path / "w.safetensors", classes=3, widths=[8, 32])
    spec = JobSpec.model_validate(
        {
            "student": {
                "arch": "cnn_tiny",
                "arch_kwargs": TINY,
                "init": {"source": "safetensors", "path": str(tmp_path / "w.safetensors")},
            }
        }
    )
    with pytest.raises(SpecError, match=r"student\.init: 'cnn_tiny'.*features\.1\.0\.weight"):
        preflight(spec, input_shape=SHAPE, num_classes=3, limits=SpecLimits(), teacher=None)


def test_a_job_starts_its_teacher_and_student_from_files_and_reports_it(tmp_path):
    from worker.pipeline.runner import run_pipeline

    digits = (1, 8, 8)
    for name, arch, classes in (("t", "cnn_small", 10), ("s", "cnn_tiny", 4)):
        torch.manual_seed(1)
        model = build_model(arch, digits, classes)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(tmp_path / f"{name}.safetensors"),
        )
    init = lambda name: {"source": "safetensors", "path": str(tmp_path / f"{name}.safetensors")}  # noqa: E731
    spec = {
        "dataset": {"source": "builtin", "name": "digits", "max_samples": 200},
        "teacher": {"arch": "cnn_small", "epochs": 1, "init": init("t")},
        "student": {"arch": "cnn_tiny", "init": init("s")},
        "distill": {"epochs": 1},
        "prune": None,
        "quantize": None,
        "export": [],
        "evaluate": {"latency_runs": 5, "latency_warmup": 1, "latency_b32_runs": 0},
    }
    report = run_pipeline(JobSpec.model_validate(spec), tmp_path / "out")
    assert report["init"]["teacher.init"]["head_replaced"] is False  # 10 classes, as digits
    assert report["init"]["student.init"]["head_replaced"] is True  # 4 in the file
    assert report["init"]["student.init"]["from"] == {
        "source": "safetensors",
        "file": "s.safetensors",
    }
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    assert stages["teacher"]["init_head_replaced"] == 0.0
    assert stages["teacher"]["init_tensors_loaded"] == len(
        build_model("cnn_small", digits, 10).state_dict()
    )
    assert stages["distill"]["init_head_replaced"] == 1.0


def test_torchvision_imagenet_weights_fit_with_their_head_replaced(tmp_path):
    """What a user does with ImageNet weights: torchvision's own mobilenet_v3_small (1000
    classes) saved as safetensors starts our mobilenet_v3_small for 224-px RGB and 5 classes."""
    from torchvision import models

    imagenet = models.mobilenet_v3_small(weights=None, num_classes=1000)
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(tmp_path / "m"))
    with torch.device("meta"):
        ours = build_model("mobilenet_v3_small", (3, 224, 224), 5)
    plan = plan_init(ours, file_header(tmp_path / "m"), "student.init")
    assert sorted(plan.replaced) == ["classifier.3.bias", "classifier.3.weight"]
    assert len(plan.load) == len(imagenet.state_dict()) - 2
