"""Quantization-aware distillation (`quantize.method: "qat"`) end to end, through
`distillery run` and through `distillery serve`: the job hands over an int8 QDQ ONNX model
that ONNX Runtime runs with int8 kernels, and whose accuracy, recomputed here from the file on
the test split, is the one the job reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.testing import LEARNING_SPEC
from tests.service_support import client, run_job, wait_for_status
from worker.pipeline.data import load_dataset
from worker.pipeline.spec import JobSpec

QAD_SPEC = {**LEARNING_SPEC, "name": "qad", "quantize": {"method": "qat", "qat_epochs": 3}}
FILE = "model.int8_qat.onnx"


def _int8_weighted_ops(path: Path) -> set[str]:
    """The ops whose weight input is DequantizeLinear of an int8 initializer."""
    graph = onnx.load(str(path)).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    return {n.op_type for n in graph.node if len(n.input) > 1 and n.input[1] in dq}


def _fused_ops(path: Path, tmp: Path) -> set[str]:
    """The ops ONNX Runtime runs after its graph optimisations (the QDQ fusions)."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}


def _accuracy(path: Path, spec: dict) -> float:
    data = load_dataset(JobSpec.model_validate(spec).dataset, spec.get("seed", 0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.asarray(data.x_test, dtype=np.float32)
    logits = session.run(None, {"input": x})[0]
    return float((logits.argmax(1) == data.y_test.numpy()).mean())


def _check_model(path: Path, reported: float, tmp: Path) -> None:
    assert {"Conv", "Gemm"} <= _int8_weighted_ops(path), "conv and linear weights are int8"
    assert {"QLinearConv", "QGemm"} <= _fused_ops(path, tmp), "ONNX Runtime runs int8 kernels"
    recomputed = _accuracy(path, QAD_SPEC)
    assert recomputed == pytest.approx(reported, abs=1e-9)
    # LEARNING_SPEC's pruned student scores 0.8 +- 0.05 here; a model at chance scores 0.1.
    assert recomputed >= 0.6


def test_distillery_run_qad(tmp_path):
    report = run_job(tmp_path, QAD_SPEC)
    out = tmp_path / "out"
    quantize = next(s for s in report["stages"] if s["name"] == "quantize")
    assert quantize["metrics"]["method_qat"] == 1.0
    _check_model(out / FILE, report["metrics"]["quantized"]["accuracy"], tmp_path)
    # It trained against the teacher: the fine-tune's epochs are in the history, with KD loss.
    with (out / "history.csv").open() as f:
        qat_rows = [r for r in csv.DictReader(f) if r["run"] == "qat"]
    assert len(qat_rows) == 3 and all(float(r["kd_loss"]) > 0 for r in qat_rows)
    card = json.loads((out / "model_card.json").read_text())["quantize"]
    assert card["method"] == "qat" and card["qat_epochs"] == 3 and card["weight_bits"] in (7, 8)


def test_serve_runs_a_qad_job(served, tmp_path):
    url, key, _ = served
    with client(url, key) as c:
        job = c.post("/v1/jobs", json=QAD_SPEC).json()
        done = wait_for_status(c, job["id"], {"succeeded", "failed"}, timeout=240)
        assert done["status"] == "succeeded", done["error"]
        artifacts = {a["name"]: a for a in c.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        assert artifacts[FILE]["format"] == "onnx-int8-qat"
        path = tmp_path / FILE
        path.write_bytes(c.get(artifacts[FILE]["url"]).content)
    _check_model(path, done["metrics"]["quantized"]["accuracy"], tmp_path)
