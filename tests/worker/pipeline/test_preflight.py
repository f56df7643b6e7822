"""The preflight: spec bounds, arch fit and feature-loss layers, checked before compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.pipeline import preflight
from worker.pipeline.archs import ARCHS
from worker.pipeline.data import known_shape, load_npz
from worker.pipeline.errors import SpecError
from worker.pipeline.limits import SpecLimits, check_structure
from worker.pipeline.preflight import ArchRef, check_model
from worker.pipeline.spec import JobSpec, NpzDataset

REPO = Path(__file__).parents[3]
DIGITS = ((1, 8, 8), 10)


def _student(arch: str, **kwargs) -> ArchRef:
    return ArchRef("student.arch", arch, kwargs, "student.arch_kwargs")


def _spec(**parts) -> JobSpec:
    return JobSpec.model_validate({"student": {"arch": "cnn_tiny"}, **parts})


# --- the defaults ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS.names())
def test_the_default_limits_pass_every_registered_arch(arch):
    check_model(_student(arch), (3, 224, 224), 1000, SpecLimits())


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.json")), ids=lambda p: p.name)
def test_the_default_limits_pass_every_shipped_example(path):
    spec = JobSpec.model_validate_json(path.read_text())
    if isinstance(spec.dataset, NpzDataset):
        x, y, names, _ = load_npz(REPO / spec.dataset.path)
        shape, classes = x.shape[1:], len(set(y.tolist()))
    else:
        shape, classes = known_shape(spec.dataset)
    preflight.preflight(
        spec,
        input_shape=shape,
        num_classes=classes,
        limits=SpecLimits(),
        teacher=preflight.teacher_of(spec),
    )


# --- structural bounds: nothing is built ----------------------------------------------------


def test_a_list_past_the_limit_is_refused_naming_its_path():
    limits = SpecLimits(max_list_length=4)
    check_structure({"hidden": [8] * 4}, where="student.arch_kwargs", limits=limits)
    with pytest.raises(SpecError) as e:
        check_structure({"hidden": [8] * 5}, where="student.arch_kwargs", limits=limits)
    assert e.value.message == "student.arch_kwargs.hidden: a list of 5 items; at most 4 are allowed"
    assert e.value.code == "invalid_spec"


def test_objects_count_their_keys_and_nesting_is_bounded():
    limits = SpecLimits(max_list_length=3, max_nesting=3)
    with pytest.raises(SpecError, match=r"^teacher\.arch_kwargs\.widths\[1\]: an object of 4 keys"):
        check_structure(
            {"widths": [1, {"a": 1, "b": 2, "c": 3, "d": 4}]},
            where="teacher.arch_kwargs",
            limits=limits,
        )
    check_structure({"widths": [[[1]]]}, where="teacher.arch_kwargs", limits=limits)  # 3 deep
    with pytest.raises(SpecError) as e:
        check_structure({"widths": [[[[1]]]]}, where="teacher.arch_kwargs", limits=limits)
    assert e.value.message == (
        "teacher.arch_kwargs.widths[0][0][0]: nested 4 levels deep; at most 3 are allowed"
    )


def test_an_unbounded_spec_is_refused_before_any_model_is_built(monkeypatch):
    """The 20,000-layer spec of the issue: meta-building it took 19 s."""
    built = []
    monkeypatch.setattr(preflight, "check_arch", lambda *a, **k: built.append(a))
    spec = _spec(student={"arch": "mlp", "arch_kwargs": {"hidden": [1] * 20_000}})
    with pytest.raises(SpecError, match=r"^student\.arch_kwargs\.hidden: a list of 20000 items"):
        preflight.preflight(
            spec, input_shape=(1, 8, 8), num_classes=10, limits=SpecLimits(), teacher=None
        )
    assert built == []


# --- layers and parameters, counted on the meta device -------------------------------------


def test_the_layer_limit_counts_modules_with_weights():
    # cnn_small with two widths: 2 conv + 2 batch norm + 1 linear classifier.
    model = _student("cnn_small", widths=[8, 8])
    check_model(model, *DIGITS, SpecLimits(max_layers=5))
    with pytest.raises(SpecError) as e:
        check_model(model, *DIGITS, SpecLimits(max_layers=4))
    assert e.value.message == (
        "student.arch: 'cnn_small' builds 5 layers with weights; at most 4 are allowed"
    )


def test_the_parameter_limit_counts_every_weight():
    # mlp on 8x8 digits, hidden [10]: 64*10+10 + 10*10+10 = 760 parameters.
    model = _student("mlp", hidden=[10])
    check_model(model, *DIGITS, SpecLimits(max_params=760))
    with pytest.raises(SpecError) as e:
        check_model(model, *DIGITS, SpecLimits(max_params=759))
    assert e.value.message == (
        "student.arch: 'mlp' builds 760 parameters for input [1, 8, 8] and 10 classes; "
        "at most 759 are allowed"
    )


def test_a_huge_model_is_refused_from_its_meta_build():
    """A trillion parameters would be 4 TB of weights; on the meta device it is just counted."""
    model = _student("mlp", hidden=[1_000_000, 1_000_000])
    with pytest.raises(SpecError, match=r"builds 1,000,076,000,010 parameters"):
        check_model(model, *DIGITS, SpecLimits())


def test_a_cached_verdict_is_per_arch_kwargs_shape_and_classes():
    """Meta builds are cached per (arch, kwargs, shape, classes): a verdict for one of them
    must never answer for another, and a refusal stays a refusal."""
    limits = SpecLimits()
    check_model(_student("cnn_small", widths=[8, 16]), *DIGITS, limits)
    check_model(_student("cnn_small", widths=[8, 16]), *DIGITS, limits)
    # Other kwargs, shape or class count are separate verdicts, not the cached one.
    with pytest.raises(SpecError, match="does not fit"):
        check_model(_student("cnn_small", widths=[0]), *DIGITS, limits)
    with pytest.raises(SpecError, match=r"does not fit input \[20\]"):
        check_model(_student("cnn_small", widths=[8, 16]), (20,), 10, limits)
    with pytest.raises(SpecError, match="'cnn_small' does not fit"):  # the cached refusal
        check_model(_student("cnn_small", widths=[0]), *DIGITS, limits)


# --- feature-loss layers --------------------------------------------------------------------

TEACHER = ArchRef("teacher.arch", "cnn_small", {}, "teacher.arch_kwargs")


def _feature(student_layer: str, teacher_layer: str, loss: str = "hint") -> JobSpec:
    feature = {"loss": loss, "student_layer": student_layer, "teacher_layer": teacher_layer}
    return _spec(distill={"feature": feature})


def _check(spec: JobSpec, teacher: ArchRef | None = TEACHER) -> None:
    preflight.preflight(
        spec, input_shape=(1, 8, 8), num_classes=10, limits=SpecLimits(), teacher=teacher
    )


def test_feature_layers_that_exist_and_match_pass():
    _check(_feature("features.1", "features.2"))
    _check(_feature("features.0", "features.1", loss="at"))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_feature_layer_typo_is_refused_listing_the_layers(role):
    spec = _feature(
        "features.9" if role == "student" else "features.1",
        "features.9" if role == "teacher" else "features.1",
    )
    with pytest.raises(SpecError) as e:
        _check(spec)
    # cnn_tiny (student) has 2 blocks, cnn_small (teacher) 3: their layers, in module order.
    blocks = 2 if role == "student" else 3
    assert e.value.message.startswith(
        f"distill.feature.{role}_layer: no layer 'features.9'; layers: features, features.0, "
        "features.0.0, features.0.1"
    ), e.value.message
    assert f"features.{blocks - 1}.0" in e.value.message
    assert f"features.{blocks}" not in e.value.message


def test_layers_of_different_kinds_are_refused():
    with pytest.raises(SpecError, match="give outputs of different kinds"):
        _check(_feature("features.1", "classifier"))
    with pytest.raises(SpecError, match="attention transfer needs convolutional"):
        _check(_feature("classifier", "classifier", loss="at"))


def test_without_a_teacher_arch_only_the_student_layer_is_checked():
    """A TorchScript upload has no arch to build: its layer is checked when it is loaded."""
    _check(_feature("features.1", "no.such.layer"), teacher=None)
    with pytest.raises(SpecError, match=r"^distill\.feature\.student_layer: no layer 'x'"):
        _check(_feature("x", "no.such.layer"), teacher=None)


def test_the_defaults_leave_room_above_the_largest_and_deepest_archs():
    """Not tuned to the edge of what ships: resnet50 (the most parameters) and
    efficientnet_b0 (the most layers) each stay under a third of their limit."""
    limits = SpecLimits()
    largest = preflight.arch_facts("resnet50", {}, (3, 224, 224), 1000)
    deepest = preflight.arch_facts("efficientnet_b0", {}, (3, 224, 224), 1000)
    assert not isinstance(largest, str) and not isinstance(deepest, str)
    assert largest.params * 3 < limits.max_params
    assert deepest.layers * 3 < limits.max_layers
