import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.pipeline.spec import JobSpec, format_validation_error

EXAMPLE = Path(__file__).parents[3] / "examples" / "digits.json"


def _error(spec: dict) -> str:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(spec)
    return format_validation_error(e.value)


def test_defaults_and_the_example_are_valid():
    spec = JobSpec()
    assert spec.dataset.name == "digits" and spec.teacher.arch == "cnn_large"
    assert spec.prune is not None and spec.quantize is not None
    example = JobSpec.model_validate_json(EXAMPLE.read_text())
    assert example.quantize.method == "int8_static"
    # The resolved spec round-trips through JSON (it is stored with every artifact).
    assert JobSpec.model_validate(json.loads(example.model_dump_json())) == example


@pytest.mark.parametrize(
    "spec,expected",
    [
        (
            {"student": {"arch": "resnet9000"}},
            "student.arch: Value error, unknown arch 'resnet9000'; known: cnn_large, cnn_small",
        ),
        (
            {"distill": {"loss": "dkd"}},
            "distill.loss: Value error, unknown loss 'dkd'; known: ce, kd",
        ),
        (
            {"prune": {"method": "lottery"}},
            "prune.method: Value error, unknown pruner 'lottery'; known: channel_l1, channel_l2, magnitude",
        ),
        (
            {"quantize": {"method": "int4"}},
            "quantize.method: Value error, unknown quantizer 'int4'; known: fp16, int8_dynamic, int8_static, qat",
        ),
        (
            {"quantize": {"calibration": "kl"}},
            "quantize.calibration: Value error, unknown calibration 'kl'; known: entropy, minmax, percentile",
        ),
        (
            {"dataset": {"source": "builtin", "name": "iris"}},
            "dataset.builtin.name: Value error, unknown builtin dataset 'iris'; known: digits",
        ),
        (
            {"dataset": {"source": "torchvision", "name": "ImageNet"}},
            "unknown torchvision dataset 'ImageNet'; known: CIFAR10, FashionMNIST, MNIST",
        ),
        (
            {"dataset": {"source": "ftp"}},
            "dataset: unknown source; known: builtin, torchvision, npz, imagefolder, upload",
        ),
        ({"distill": {"temperature": 0}}, "distill.temperature: Input should be greater than 0"),
        ({"distill": {"alpha": 1.5}}, "distill.alpha: Input should be less than or equal to 1"),
        ({"prune": {"amount": 1.0}}, "prune.amount: Input should be less than 1"),
        ({"device": "tpu"}, "device: String should match pattern"),
        ({"epochs": 3}, "epochs: Extra inputs are not permitted"),
        (
            {"student": {"arch": "cnn_small", "arch_kwargs": {"depth": 3}}},
            "arch 'cnn_small' takes no argument 'depth'; it takes: widths",
        ),
        (
            {"export": ["tflite"]},
            "export[0]: Input should be 'onnx', 'torchscript' or 'safetensors'",
        ),
    ],
)
def test_invalid_specs_name_the_field(spec, expected):
    assert expected in _error(spec)


def test_feature_loss_with_an_onnx_teacher_is_refused_up_front():
    msg = _error(
        {
            "teacher": {"source": "onnx", "path": "t.onnx"},
            "distill": {"feature": {"teacher_layer": "a", "student_layer": "b"}},
        }
    )
    assert "feature losses need the teacher's inner layers" in msg


def test_optional_stages_can_be_switched_off():
    spec = JobSpec.model_validate({"prune": None, "quantize": None})
    assert spec.prune is None and spec.quantize is None


@pytest.mark.parametrize(
    "spec,expected",
    [
        (
            {"quantize": {"method": "int8_dynamic", "keep_float": ["/head/Gemm"]}},
            "quantize: Value error, keep_float: only for method int8_static",
        ),
        (
            {"quantize": {"method": "fp16", "max_accuracy_drop": 0.01, "sensitivity": True}},
            "max_accuracy_drop, sensitivity: only for method int8_static",
        ),
        (
            {"dataset": {"val_fraction": 0}, "quantize": {"max_accuracy_drop": 0.01}},
            "quantize.max_accuracy_drop: needs a validation split",
        ),
        (
            {"quantize": {"sensitivity": True}, "search": {"prune.amount": [0.3, 0.5]}},
            "quantize.sensitivity: not available in a search",
        ),
        ({"quantize": {"max_accuracy_drop": 2}}, "quantize.max_accuracy_drop: Input should be"),
        ({"quantize": {"keep_float": [""]}}, "quantize.keep_float[0]: String should have at least"),
        ({"quantize": {"sensitivity": {"max_nodes": 0}}}, "quantize.sensitivity.max_nodes"),
    ],
)
def test_accuracy_control_specs_that_cannot_run_are_refused(spec, expected):
    assert expected in _error(spec)


def test_sensitivity_true_means_the_default_bounds():
    q = JobSpec.model_validate({"quantize": {"sensitivity": True}}).quantize
    assert q is not None and q.sensitivity is not None and q.sensitivity.max_nodes == 24
    q = JobSpec.model_validate({"quantize": {"sensitivity": False}}).quantize
    assert q is not None and q.sensitivity is None
