"""Accuracy-controlled int8 and per-node sensitivity, end to end through `distillery run` and
through the service: on a model int8 breaks in one known node (tests/factories.py), the job
keeps the node the user named and the one that broke in float, and no other; the sensitivity
files are listed and downloadable; a node name the model lacks fails the job naming the
known ones; a budget on a quantizer that cannot go node by node is a 422."""

from __future__ import annotations

import csv
import io
import json

import onnx

from tests import factories
from tests.service_support import client, run_job, wait_for_status

EVALUATE = {"latency_runs": 5, "latency_warmup": 1, "latency_b32_runs": 0, "compare_rounds": 0}
QUANTIZE = {
    "method": "int8_static",
    "per_channel": False,  # per-tensor weights: what the outlier breaks
    "calibration_samples": 64,
    "keep_float": ["logits"],
    "max_accuracy_drop": 0.0,
    "sensitivity": True,
}


def _spec(dataset: dict, teacher: dict, **quantize) -> dict:
    return {
        "dataset": dataset,
        "teacher": teacher,
        "student": None,  # the teacher itself is quantized: no training, a second or so
        "prune": None,
        "quantize": {**QUANTIZE, **quantize},
        "export": ["onnx"],
        "evaluate": EVALUATE,
    }


def _float_nodes(path) -> set[str]:
    """Nodes of a QDQ model whose weights are read in float (no DequantizeLinear before
    them): read from the file, independently of what the job says."""
    graph = onnx.load(str(path)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name
        for n in graph.node
        if n.op_type == "Gemm" and not any(i in dequantized for i in n.input[1:2])
    }


def _check_quantize_stage(metrics: dict) -> None:
    ranking = [r["node"] for r in metrics["sensitivity"]]
    assert ranking == ["hidden1", "hidden2"]  # the outlier's node first; `logits` was kept
    assert metrics["sensitivity"][0]["recovered"] > 0.5  # ~2/3: from chance (1/3) to all right
    ac = metrics["accuracy_control"]
    assert ac["val_accuracy_drop_whole"] > 0.5 and ac["val_accuracy_drop"] == 0.0 and ac["met"]
    assert metrics["float_nodes"] == ["logits", "hidden1"]
    # weights of hidden1 (6x6 + 6) and logits (3x6 + 3) of 105 quantizable
    assert abs(metrics["float_share"] - 63 / 105) < 1e-9


def test_distillery_run(tmp_path):
    dataset = {"source": "npz", "path": str(factories.outlier_npz(tmp_path / "rows.npz"))}
    teacher = {"source": "onnx", "path": str(factories.outlier_teacher(tmp_path / "t.onnx"))}
    report = run_job(tmp_path, _spec(dataset, teacher))
    out = tmp_path / "out"
    quantize = next(s for s in report["stages"] if s["name"] == "quantize")["metrics"]
    _check_quantize_stage(quantize)
    assert _float_nodes(out / "model.int8.onnx") == {"hidden1", "logits"}
    m = report["metrics"]
    assert m["teacher"]["accuracy"] > 0.9
    assert m["quantized"]["accuracy"] == m["teacher"]["accuracy"]  # the test split agrees
    assert quantize["test_accuracy_drop"] == 0.0 and len(quantize["test_accuracy_drop_ci"]) == 2

    card = json.loads((out / "model_card.json").read_text())["quantize"]
    assert card["float_nodes"] == ["logits", "hidden1"] and card["float_share"] == 0.6
    assert card["accuracy_control"]["test_accuracy_drop_ci"] == quantize["test_accuracy_drop_ci"]
    assert card["top_offenders"][0]["node"] == "hidden1"
    assert report["quantize"]["top_offenders"][0]["node"] == "hidden1"

    listed = {a["name"]: a for a in report["artifacts"]}
    assert listed["sensitivity.json"]["format"] == "json"
    doc = json.loads((out / "sensitivity.json").read_text())
    assert doc["samples"] == quantize["val_samples"] and doc["skipped"] == []
    rows = list(csv.DictReader((out / "sensitivity.csv").open()))
    assert [r["node"] for r in rows] == ["hidden1", "hidden2"] and rows[0]["rank"] == "1"


def _upload(c, route: str, path) -> str:
    with open(path, "rb") as f:
        r = c.post(route, files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _finished(c, spec: dict) -> dict:
    r = c.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return wait_for_status(c, r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)


def test_serve(served, tmp_path):
    url, key, _ = served
    with client(url, key) as c:
        rows = _upload(c, "/v1/datasets", factories.outlier_npz(tmp_path / "rows.npz"))
        model = _upload(c, "/v1/models", factories.outlier_teacher(tmp_path / "t.onnx"))
        dataset = {"source": "upload", "id": rows}
        teacher = {"source": "upload", "id": model}

        job = _finished(c, _spec(dataset, teacher))
        assert job["status"] == "succeeded", job["error"]
        _check_quantize_stage(next(s for s in job["stages"] if s["name"] == "quantize")["metrics"])
        base = f"/v1/jobs/{job['id']}/artifacts"
        names = {a["name"] for a in c.get(base).json()["data"]}
        assert {"sensitivity.json", "sensitivity.csv", "model.int8.onnx"} <= names
        doc = c.get(f"{base}/sensitivity.json").json()
        assert [n["node"] for n in doc["nodes"]] == ["hidden1", "hidden2"]
        table = c.get(f"{base}/sensitivity.csv").text
        assert list(csv.DictReader(io.StringIO(table)))[0]["node"] == "hidden1"
        int8 = tmp_path / "int8.onnx"
        int8.write_bytes(c.get(f"{base}/model.int8.onnx").content)
        assert _float_nodes(int8) == {"hidden1", "logits"}

        # a node the model lacks: the job fails naming the ones it has
        job = _finished(c, _spec(dataset, teacher, keep_float=["hidden9"]))
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_spec"
        message = job["error"]["message"]
        assert "'hidden9'" in message and "hidden1, hidden2, logits" in message

        # a budget for a quantizer that quantizes the whole graph at once: refused at POST
        spec = _spec(dataset, teacher)
        spec["quantize"] = {"method": "int8_dynamic", "max_accuracy_drop": 0.01}
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 422, r.text
        assert "max_accuracy_drop: only for method int8_static" in r.json()["error"]["message"]
