"""Accuracy-controlled PTQ hands over to quantization-aware distillation when it would leave
too much of the model in float (`quantize.qat_fallback_share`) or still misses its budget."""

from __future__ import annotations

import csv
import json

import onnx
import pytest

from app.testing import LEARNING_SPEC
from worker.pipeline import sensitivity
from worker.pipeline.runner import run_pipeline
from worker.pipeline.spec import JobSpec
from worker.pipeline.stages import _qat_fallback_reason

MET = {"accuracy_control": {"met": True}, "float_share": 0.1}


def _spec(**quantize) -> JobSpec:
    return JobSpec.model_validate(
        {
            **LEARNING_SPEC,
            "quantize": {"method": "int8_static", "max_accuracy_drop": 0.05, **quantize},
        }
    )


@pytest.mark.parametrize(
    "quantize,controlled,model,falls_back",
    [
        ({}, MET, object(), False),  # 10% in float, under the 25% default
        ({}, {**MET, "float_share": 0.6}, object(), True),
        ({}, {"accuracy_control": {"met": False}, "float_share": 0.0}, object(), True),
        ({"qat_fallback_share": None}, {**MET, "float_share": 0.6}, object(), False),
        ({"keep_float": ["n"]}, {**MET, "float_share": 0.6}, object(), False),  # the user's
        (
            {},
            {**MET, "float_share": 0.6},
            None,
            False,
        ),  # an uploaded ONNX teacher: nothing to train
        ({}, {"float_share": 0.6}, object(), False),  # no accuracy control ran
    ],
)
def test_when_ptq_hands_over(quantize, controlled, model, falls_back):
    reason = _qat_fallback_reason(_spec(**quantize), controlled, model)
    assert (reason is not None) == falls_back


def test_a_job_whose_ptq_keeps_most_in_float_ships_a_qat_model(tmp_path, monkeypatch):
    """Accuracy control runs for real; its outcome is then read as if it had returned most of
    the weights to float (this small model rarely needs it): the stage must run qat, write
    its int8 model in the int8 file, and say so in the stage and the model card."""
    real = sensitivity.run

    def most_in_float(*args, **kwargs):
        out = real(*args, **kwargs)
        out["float_share"] = 0.9
        out["accuracy_control"]["met"] = True
        return out

    monkeypatch.setattr(sensitivity, "run", most_in_float)
    spec = _spec(qat_epochs=2, calibration_samples=64)
    report = run_pipeline(spec, tmp_path)
    stage = next(s for s in report["stages"] if s["name"] == "quantize")["metrics"]
    assert "90%" in stage["qat_fallback"] and stage["method_qat"] == 1.0
    # The int8 file is qat's: every conv and linear weight is int8 behind a DequantizeLinear.
    graph = onnx.load(str(tmp_path / "model.int8.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert layers and all(n.input[1] in dequantized for n in layers)
    with (tmp_path / "history.csv").open() as f:
        assert len([r for r in csv.DictReader(f) if r["run"] == "qat"]) == 2
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["quantize"]["qat_fallback"] == stage["qat_fallback"]
