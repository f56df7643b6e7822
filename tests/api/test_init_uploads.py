"""Starting weights named by upload id at POST /v1/jobs: checked from the stored file's
header (a mismatch is a 422 naming the tensors), refused when they are not safetensors or
for another arch, and kept from deletion while a job that starts from them is not finished."""

from __future__ import annotations

import json

from safetensors.torch import save_file

from tests.service_support import TINY_SPEC
from worker.pipeline.archs import build_model

STUDENT = TINY_SPEC["student"]  # cnn_tiny [8, 16] on digits (1, 8, 8), 10 classes


def _weights(tmp_path, name: str, arch: str = "cnn_tiny", classes: int = 4, **kwargs) -> bytes:
    model = build_model(arch, (1, 8, 8), classes, **kwargs)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.read_bytes()


def _upload(c, name: str, body: bytes, **fields) -> str:
    r = c.post("/v1/models", files={"file": (name, body)}, data=fields)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _job(c, init_id: str):
    init = {"source": "upload", "id": init_id}
    return c.post("/v1/jobs", json={**TINY_SPEC, "student": {**STUDENT, "init": init}})


def test_weights_that_do_not_fit_are_refused_naming_the_tensors(api, tmp_path):
    kwargs = json.dumps(STUDENT["arch_kwargs"])
    with api.client("init") as c:
        wide = _weights(tmp_path, "wide.safetensors", widths=[8, 24])
        r = _job(c, _upload(c, "wide.safetensors", wide, arch="cnn_tiny", arch_kwargs=kwargs))
        assert r.status_code == 422
        msg = r.json()["error"]["message"]
        assert "features.1.0.weight [24, 8, 3, 3] in the file vs [16, 8, 3, 3]" in msg
        assert "/" not in msg  # no server path

        other = _weights(tmp_path, "mlp.safetensors", arch="mlp_small", classes=10)
        r = _job(c, mlp_id := _upload(c, "mlp.safetensors", other, arch="mlp_small"))
        assert r.status_code == 422
        assert r.json()["error"]["message"] == (
            f"student.init.id: model {mlp_id!r} holds weights for arch 'mlp_small'; "
            "student.arch is 'cnn_tiny'"
        )
        path_init = {"source": "safetensors", "path": "/etc/passwd"}
        r = c.post("/v1/jobs", json={**TINY_SPEC, "student": {**STUDENT, "init": path_init}})
        assert r.status_code == 422 and "reads a path on the server" in r.text


def test_weights_a_live_job_starts_from_cannot_be_deleted_then_can(api, tmp_path):
    kwargs = json.dumps(STUDENT["arch_kwargs"])
    with api.client("init-delete") as c:
        body = _weights(tmp_path, "w.safetensors", widths=[8, 16])  # 4 classes: head replaced
        weights = _upload(c, "w.safetensors", body, arch="cnn_tiny", arch_kwargs=kwargs)
        r = _job(c, weights)
        assert r.status_code == 201, r.text
        refused = c.delete(f"/v1/models/{weights}")
        assert refused.status_code == 409 and r.json()["id"] in refused.text
        c.post(f"/v1/jobs/{r.json()['id']}/cancel")
        assert c.delete(f"/v1/models/{weights}").status_code == 204
