"""A student started from the user's weights, and a job with no student (the teacher itself
compressed), each end to end through `distillery run` and through `distillery serve`; and the
422s a spec gets at POST when its weights do not fit or its teacher cannot be pruned."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests import factories
from tests.service_support import client, run_job, wait_for_status
from worker.pipeline.archs import build_model

SHAPE = (3, 16, 16)
TINY = {"widths": [8, 16]}
FAST = {
    "distill": {"epochs": 2},
    "prune": {"amount": 0.5, "finetune_epochs": 1},
    "quantize": {"method": "int8_dynamic"},
    "evaluate": {
        "latency_runs": 5,
        "latency_warmup": 1,
        "latency_b32_runs": 0,
        "compare_rounds": 0,
    },
}
TRAIN = {"source": "train", "arch": "cnn_tiny", "epochs": 2}
# cnn_tiny [8, 16]: 2 conv blocks (conv weight; bn weight, bias, mean, var, count) + the head
BODY_TENSORS = 2 * 6


def _pretrained(path, classes: int = 5, widths=(8, 16)):
    """Weights for cnn_tiny trained elsewhere, on another task with `classes` classes."""
    torch.manual_seed(3)
    model = build_model("cnn_tiny", SHAPE, classes, widths=list(widths))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _stage(report_or_job: dict, name: str) -> dict:
    return next(s for s in report_or_job["stages"] if s["name"] == name)


@pytest.mark.parametrize("case", ["pretrained", "compress-only"])
def test_distilleryrun_job(tmp_path, case):
    archive = factories.write_archive(tmp_path / "img.zip", factories.colour_images(12))
    dataset = {"source": "imagefolder", "path": str(archive), "image_size": 16}
    if case == "pretrained":
        init = {"source": "safetensors", "path": str(_pretrained(tmp_path / "w.safetensors"))}
        student = {"arch": "cnn_tiny", "arch_kwargs": TINY, "init": init}
    else:
        student = None
    report = run_job(tmp_path, {"dataset": dataset, "teacher": TRAIN, "student": student, **FAST})
    names = [s["name"] for s in report["stages"]]
    if case == "pretrained":
        assert names == ["data", "teacher", "baseline", "distill", "prune", "quantize", "export"]
        assert report["init"]["student.init"] == {
            "from": {"source": "safetensors", "file": "w.safetensors"},
            "tensors_loaded": BODY_TENSORS,
            "head_replaced": True,  # 5 classes in the file, 3 in the data
            "replaced": ["classifier.weight", "classifier.bias"],
        }
        for stage in ("baseline", "distill"):  # both start from the same weights
            assert _stage(report, stage)["metrics"]["init_head_replaced"] == 1.0
    else:
        assert names == ["data", "teacher", "prune", "quantize", "export"]
        assert report["compress_only"] is True and report["init"] == {}
        m = report["metrics"]
        assert m["pruned"]["params"] < m["teacher"]["params"]
        assert m["final"]["model"] in {"pruned", "quantized"}


# --- through the service ---------------------------------------------------------------------


def _upload(c, route: str, path, **fields) -> str:
    with open(path, "rb") as f:
        r = c.post(route, files={"file": (path.name, f)}, data=fields)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _succeeded(c, spec: dict) -> dict:
    r = c.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = wait_for_status(c, r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job


def _refused(c, spec: dict) -> str:
    r = c.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    return r.json()["error"]["message"]


def test_serve(served, tmp_path):
    url, key, _ = served
    archive = factories.write_archive(tmp_path / "img.zip", factories.colour_images(12))
    with client(url, key) as c:
        data = {"source": "upload", "id": _upload(c, "/v1/datasets", archive), "image_size": 16}
        kwargs = json.dumps(TINY)
        weights = _upload(
            c, "/v1/models", _pretrained(tmp_path / "w.safetensors"), arch="cnn_tiny",
            arch_kwargs=kwargs,
        )  # fmt: skip
        student = {"arch": "cnn_tiny", "arch_kwargs": TINY}
        init = {"source": "upload", "id": weights}
        job = _succeeded(
            c, {"dataset": data, "teacher": TRAIN, "student": {**student, "init": init}, **FAST}
        )
        assert _stage(job, "distill")["metrics"]["init_head_replaced"] == 1.0
        card = c.get(f"/v1/jobs/{job['id']}/artifacts/model_card.json").json()
        assert card["init"]["student.init"]["from"] == init  # the id, not a worker's path
        assert card["init"]["student.init"]["tensors_loaded"] == BODY_TENSORS

        teacher = factories.user_teacher(SHAPE, 3, tmp_path / "t.safetensors", "safetensors")
        uploaded = {"source": "upload", "id": _upload(c, "/v1/models", teacher, arch="cnn_tiny")}
        job = _succeeded(c, {"dataset": data, "teacher": uploaded, "student": None, **FAST})
        assert [s["name"] for s in job["stages"]] == [
            "data",
            "teacher",
            "prune",
            "quantize",
            "export",
        ]
        assert job["metrics"]["pruned"]["params"] < job["metrics"]["teacher"]["params"]

        # a search with the teacher itself and a pretrained student on its students axis
        axes = {"student": [None, {**student, "init": init}], "prune.amount": [0, 0.5]}
        search = {"dataset": data, "teacher": uploaded, **FAST, "search": axes}
        job = _succeeded(c, search)
        listed = c.get(f"/v1/jobs/{job['id']}/candidates").json()["data"]
        by_key = {cand["key"]: cand for cand in listed}
        assert sorted(by_key) == ["s0-d0-p0-q0", "s0-d0-p0-q1", "s0-d0-p1-q0", "s0-d0-p1-q1",
                                  "s1-d0-p0-q0", "s1-d0-p0-q1", "s1-d0-p1-q0", "s1-d0-p1-q1"]  # fmt: skip
        teacher_itself = by_key["s0-d0-p0-q0"]
        assert teacher_itself["axes"]["student"] is None
        assert teacher_itself["metrics"]["accuracy"] == job["metrics"]["teacher"]["accuracy"]
        assert by_key["s0-d0-p1-q0"]["metrics"]["params"] < teacher_itself["metrics"]["params"]
        assert by_key["s1-d0-p0-q0"]["axes"]["student"]["init"] == init  # as sent, no path

        # --- refused at POST, naming the problem
        wide = _pretrained(tmp_path / "wide.safetensors", widths=(8, 32))
        wide_id = _upload(c, "/v1/models", wide, arch="cnn_tiny", arch_kwargs=kwargs)
        bad = {**student, "init": {"source": "upload", "id": wide_id}}
        msg = _refused(c, {"dataset": data, "teacher": TRAIN, "student": bad, **FAST})
        assert msg.startswith("student.init: 'cnn_tiny': the weights do not fit the model")
        assert "features.1.0.weight [32, 8, 3, 3] in the file vs [16, 8, 3, 3]" in msg
        onnx = factories.user_teacher(SHAPE, 3, tmp_path / "t.onnx", "onnx")
        onnx_id = _upload(c, "/v1/models", onnx)
        bad = {**student, "init": {"source": "upload", "id": onnx_id}}
        msg = _refused(c, {"dataset": data, "teacher": TRAIN, "student": bad, **FAST})
        assert f"student.init.id: model {onnx_id!r} is onnx" in msg
        onnx_teacher = {"source": "upload", "id": onnx_id}
        msg = _refused(c, {"dataset": data, "teacher": onnx_teacher, "student": None, **FAST})
        assert "prune: an ONNX teacher can be quantized but not pruned" in msg
