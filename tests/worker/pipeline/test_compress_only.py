"""Compress-only jobs (`"student": null`): the teacher itself pruned, fine-tuned against its
own original outputs, and quantized; measured and chosen like any job, searchable too. What
cannot work (an ONNX teacher pruned) is refused before anything runs."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from app.testing import LEARNING_SPEC
from tests import factories
from worker.pipeline.archs import build_model
from worker.pipeline.export import export_onnx
from worker.pipeline.runner import run_pipeline
from worker.pipeline.spec import JobSpec, format_validation_error

COMPRESS = {
    **LEARNING_SPEC,
    "name": "compress-only",
    "teacher": {**LEARNING_SPEC["teacher"], "epochs": 12},
    "student": None,
    "prune": {"amount": 0.5, "finetune_epochs": 6},
    "quantize": {"method": "int8_dynamic"},
}


def _refusal(spec: dict) -> str:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(spec)
    return format_validation_error(e.value)


def test_what_a_compress_only_job_cannot_do_is_refused_by_name():
    onnx = {"source": "onnx", "path": "t.onnx"}
    assert "ask for prune, quantize or both" in _refusal(
        {"student": None, "prune": None, "quantize": None}
    )
    msg = _refusal({"student": None, "teacher": onnx, "export": ["onnx"]})
    assert "prune: an ONNX teacher can be quantized but not pruned" in msg
    msg = _refusal({"student": None, "teacher": onnx, "prune": None})
    assert 'export: an ONNX teacher compressed without a student exports only "onnx"' in msg
    feature = {"teacher_layer": "features.0", "student_layer": "features.0"}
    assert "distill.feature" in _refusal({"student": None, "distill": {"feature": feature}})
    search = {"prune.amount": [0.3]}
    assert "teacher.source: a search that compresses the teacher itself" in _refusal(
        {"student": None, "teacher": onnx, "prune": None, "export": [], "search": search}
    )
    qat = {"method": "qat"}
    msg = _refusal({"student": None, "teacher": onnx, "prune": None, "quantize": qat})
    assert "quantize.method: qat fine-tunes the model's layers, which an ONNX teacher" in msg
    # quantize-only over an ONNX teacher is fine
    JobSpec.model_validate({"student": None, "teacher": onnx, "prune": None, "export": ["onnx"]})


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress")
    events: list[dict] = []
    report = run_pipeline(JobSpec.model_validate(COMPRESS), out, on_event=events.append)
    return out, report, events


def test_the_teacher_is_pruned_fine_tuned_against_itself_and_quantized(compressed):
    out, report, events = compressed
    assert [s["name"] for s in report["stages"]] == [
        "data",
        "teacher",
        "prune",
        "quantize",
        "export",
    ]
    runs = Counter(e["row"]["run"] for e in events if e["type"] == "history")
    assert set(runs) == {"teacher", "finetune1"}  # no student was trained
    m = report["metrics"]
    assert report["compress_only"] is True
    assert m["pruned"]["params"] < 0.6 * m["teacher"]["params"]
    # 12-epoch cnn_small on 300 digits scores ~0.9; a half-pruned net not fine-tuned falls
    # far below, one fine-tuned against the teacher's outputs comes back within a few points.
    assert m["teacher"]["accuracy"] >= 0.8
    assert m["pruned"]["accuracy"] >= m["teacher"]["accuracy"] - 0.1
    assert m["final"]["model"] in {"pruned", "quantized"}
    assert m["quantized"]["size_bytes"] < m["teacher"]["size_bytes"]
    card = json.loads((out / "model_card.json").read_text())
    assert card["model"]["arch"] == COMPRESS["teacher"]["arch"]  # the teacher's, rebuilt
    prune_stage = next(s for s in report["stages"] if s["name"] == "prune")
    assert prune_stage["metrics"]["self_distilled"] == 1.0


def test_a_search_without_students_compresses_the_teacher(tmp_path):
    spec = {
        **COMPRESS,
        "prune": {"amount": 0.5, "finetune_epochs": 3},
        "search": {"prune.amount": [0, 0.5], "quantize.method": [None, "int8_dynamic"]},
    }
    report = run_pipeline(JobSpec.model_validate(spec), tmp_path)
    by_key = {c["key"]: c for c in report["candidates"]}
    assert sorted(by_key) == ["s0-d0-p0-q0", "s0-d0-p0-q1", "s0-d0-p1-q0", "s0-d0-p1-q1"]
    assert all(c["axes"]["student"] is None for c in by_key.values())
    unpruned = by_key["s0-d0-p0-q0"]
    assert unpruned["kept"] == "teacher"  # the teacher itself, measured as a candidate
    assert unpruned["metrics"]["accuracy"] == report["metrics"]["teacher"]["accuracy"]
    assert unpruned["metrics"]["params"] == report["metrics"]["teacher"]["params"]
    assert by_key["s0-d0-p1-q0"]["metrics"]["params"] < 0.6 * unpruned["metrics"]["params"]
    assert report["metrics"]["final"]["model"] != "s0-d0-p0-q0"  # objective size: compressed
    assert (tmp_path / "model.safetensors").exists()


def test_an_onnx_teacher_is_quantized_without_a_student(tmp_path):
    npz = factories.digits_npz(tmp_path / "digits.npz", n=300)
    # Big enough for int8 to pay (the factories' ONNX teacher is smaller than int8's overhead).
    onnx = export_onnx(
        build_model("cnn_small", (1, 8, 8), 10), torch.zeros(1, 1, 8, 8), tmp_path / "t.onnx"
    )
    spec = {
        "dataset": {"source": "npz", "path": str(npz)},
        "teacher": {"source": "onnx", "path": str(onnx)},
        "student": None,
        "prune": None,
        "quantize": {"method": "int8_dynamic"},
        "export": ["onnx"],
        "evaluate": {"latency_runs": 5, "latency_warmup": 1, "compare_rounds": 0},
    }
    report = run_pipeline(JobSpec.model_validate(spec), tmp_path / "out")
    assert [s["name"] for s in report["stages"]] == ["data", "teacher", "quantize", "export"]
    m = report["metrics"]
    assert m["quantized"]["size_bytes"] < 0.5 * m["teacher"]["size_bytes"]
    assert m["final"]["model"] == "quantized"
    assert (tmp_path / "out" / "model.onnx").read_bytes() == onnx.read_bytes()
    assert {a["name"] for a in report["artifacts"]} >= {"model.int8_dynamic.onnx", "model.onnx"}


def test_a_finished_compress_only_job_run_again_resumes_every_stage(compressed):
    out, report, _ = compressed
    events: list[dict] = []
    again = run_pipeline(JobSpec.model_validate(COMPRESS), out, on_event=events.append)
    resumed = [e["stage"] for e in events if e["type"] == "stage" and e.get("resumed")]
    assert resumed == ["teacher", "prune", "quantize", "export"]
    assert not any(e["type"] == "history" for e in events)  # nothing trained again
    for key in ("teacher", "pruned", "quantized"):  # the pruned teacher reloaded by its arch
        assert again["metrics"][key]["accuracy"] == report["metrics"][key]["accuracy"]
    assert again["metrics"]["final"]["model"] == report["metrics"]["final"]["model"]
