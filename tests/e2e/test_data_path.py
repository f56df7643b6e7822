"""An ImageFolder job of a few hundred JPEGs through `distillery serve`, its data read per batch
from the decoded cache by DataLoader workers (DATA_RESIDENT_BYTES=0 forces the path a large
dataset takes); and a corrupt JPEG among them failing a job with the member's name, through
`distillery run` and through an upload the service's header-only check accepts."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests import factories
from tests.service_support import cli, client, serving, wait_for_status
from tests.worker.pipeline.test_samples import _jpegs

SPEC = {
    "name": "jpegs",
    "teacher": {"source": "train", "arch": "cnn_tiny", "arch_kwargs": {"widths": [8, 16]}},
    "student": {"arch": "cnn_tiny", "arch_kwargs": {"widths": [8, 8]}},
    "distill": {"epochs": 6},
    "quantize": {"method": "int8_static", "calibration_samples": 64},
    "evaluate": {"latency_runs": 5, "latency_warmup": 1},
}


@pytest.fixture(scope="module")
def streaming(tmp_path_factory):
    home = tmp_path_factory.mktemp("streaming")
    with serving(home, DATA_RESIDENT_BYTES="0", DATA_WORKERS="1") as s:
        yield s


def _upload(c, path) -> str:
    with open(path, "rb") as f:
        r = c.post("/v1/datasets", files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _run(c, dataset_id: str) -> dict:
    spec = {**SPEC, "dataset": {"source": "upload", "id": dataset_id, "image_size": 20}}
    r = c.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return wait_for_status(c, r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=300)


def test_a_jpeg_imagefolder_job_streams_through_serve_and_shows_its_data_stage(streaming, tmp_path):
    url, key, _ = streaming
    archive = factories.write_archive(tmp_path / "jpegs.zip", _jpegs(100))  # 300 JPEGs
    with client(url, key) as c:
        job = _run(c, _upload(c, archive))
        assert job["status"] == "succeeded", job["error"]
        data = job["stages"][0]
        assert data["name"] == "data" and data["status"] == "succeeded" and data["seconds"] > 0
        m = data["metrics"]
        assert m["images"] == m["samples"] == 300 and m["read_per_batch"]
        assert m["bytes"] == 300 * 3 * 20 * 20 and m["decode_images_per_second"] > 0
        # Three colours: chance is a third; read from disk with their labels, they are learned.
        assert job["metrics"]["teacher"]["accuracy"] >= 0.9
        assert job["metrics"]["student"]["accuracy"] >= 0.9


def test_a_corrupt_jpeg_fails_distillery_run_as_a_dataset_error_naming_it(tmp_path):
    members = _jpegs(100)
    members["blue/0042.jpg"] = members["blue/0042.jpg"][:200]  # cut short
    archive = factories.write_archive(tmp_path / "broken.tar.gz", members)
    dataset = {"source": "imagefolder", "path": str(archive), "image_size": 20}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "dataset": dataset}))
    proc = cli(
        "run", str(spec), "--out", str(tmp_path / "out"),
        env={"DATA_RESIDENT_BYTES": "0", "DATA_WORKERS": "2"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err  # EXIT_JOB_FAILED
    assert "error [invalid_dataset]: broken.tar.gz: cannot decode blue/0042.jpg (" in err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert not list((tmp_path / "out" / ".work" / "tmp-data").glob("images-*"))  # nothing kept


def test_a_jpeg_cut_past_its_header_is_accepted_at_upload_and_fails_the_job_naming_it(
    streaming, tmp_path
):
    """The upload check reads headers only (cheap for 20,000 photos); decoding is the job's."""
    url, key, _ = streaming
    members = _jpegs(20)
    whole = members["blue/0007.jpg"]
    scan = whole.index(b"\xff\xda")  # start of scan: every header segment lies before it
    members["blue/0007.jpg"] = whole[: (scan + len(whole)) // 2]  # header whole, the scan cut
    archive = factories.write_archive(tmp_path / "cut.zip", members)
    with client(url, key) as c:
        dataset_id = _upload(c, archive)  # accepted: 201
        job = _run(c, dataset_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_dataset", job["error"]
    assert "cannot decode blue/0007.jpg (" in job["error"]["message"]
    assert "Traceback" not in job["error"]["message"]
    assert job["stages"][0]["name"] == "data" and job["stages"][0]["status"] == "failed"
