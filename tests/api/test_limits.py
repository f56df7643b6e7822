"""What a request may weigh and what a spec may ask for, through the live API."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest

from tests.service_support import TINY_SPEC, post_declaring


def _refusal(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]["message"]


def _spec(**parts) -> dict:
    spec = copy.deepcopy(TINY_SPEC)
    spec.update(parts)
    return spec


# --- the body cap ---------------------------------------------------------------------------


def test_a_spec_body_over_the_cap_is_413_and_at_the_cap_is_accepted(api, monkeypatch):
    body = json.dumps(TINY_SPEC).encode()
    headers = {"content-type": "application/json"}
    with api.client() as c:
        monkeypatch.setattr(api.settings, "MAX_REQUEST_BYTES", len(body) - 1)
        r = c.post("/v1/jobs", content=body, headers=headers)
        assert _refusal(r, 413, "payload_too_large") == (
            f"request body of {len(body)} bytes is over the {len(body) - 1} byte limit "
            "(files go to POST /v1/datasets and POST /v1/models)"
        )
        monkeypatch.setattr(api.settings, "MAX_REQUEST_BYTES", len(body))
        assert c.post("/v1/jobs", content=body, headers=headers).status_code == 201


def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_read(api):
    """Content-Length: 1000000000 used to hold the connection while the server waited."""
    r = post_declaring(
        api.url,
        "/v1/jobs",
        key=api.key("alice"),
        length=1_000_000_000,
        content_type="application/json",
    )
    assert r.headers["connection"] == "close"  # the rest of the body will never be read
    assert _refusal(r, 413, "payload_too_large").startswith(
        "request body of 1000000000 bytes is over the 1048576 byte limit"
    )


def test_a_chunked_body_is_cut_off_at_the_cap(api):
    def chunks():  # no Content-Length: 4 MiB of JSON whitespace, counted as it comes
        for _ in range(64):
            yield b" " * 65536

    with api.client() as c:
        r = c.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert _refusal(r, 413, "payload_too_large").startswith(
        "request body is over the 1048576 byte limit"
    )


def test_uploads_keep_their_own_cap(api, monkeypatch):
    monkeypatch.setattr(api.settings, "MAX_REQUEST_BYTES", 1000)
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.random((40, 8), dtype=np.float32), y=np.arange(40) % 4)
    assert len(buf.getvalue()) > 1000
    with api.client() as c:
        r = c.post("/v1/datasets", files={"file": ("rows.npz", buf.getvalue())})
    assert r.status_code == 201, r.text


# --- spec bounds, each naming its field -----------------------------------------------------


@pytest.mark.parametrize(
    "parts,message",
    [
        (
            {"student": {"arch": "mlp", "arch_kwargs": {"hidden": [1] * 20_000}}},
            "student.arch_kwargs.hidden: a list of 20000 items; at most 64 are allowed",
        ),
        (
            {"teacher": {"arch": "cnn_small", "arch_kwargs": {"widths": [8] * 65}}},
            "teacher.arch_kwargs.widths: a list of 65 items; at most 64 are allowed",
        ),
        (
            {"student": {"arch": "mlp", "arch_kwargs": {"hidden": [[[[[1]]]]]}}},
            "student.arch_kwargs.hidden[0][0][0][0]: nested 5 levels deep; at most 4 are allowed",
        ),
        (
            # 64*1e5+1e5 + 1e5*1e5+1e5 + 1e5*10+10 parameters: 40 GB of weights.
            {"student": {"arch": "mlp", "arch_kwargs": {"hidden": [100_000, 100_000]}}},
            "student.arch: 'mlp' builds 10,007,600,010 parameters for input [1, 8, 8] and "
            "10 classes; at most 100,000,000 are allowed",
        ),
    ],
    ids=["list length", "teacher list length", "nesting", "parameters"],
)
def test_a_spec_past_a_bound_is_refused_naming_the_field(api, parts, message):
    with api.client() as c:
        r = c.post("/v1/jobs", json=_spec(**parts))
    assert _refusal(r, 422, "invalid_spec") == message


def test_the_bounds_are_settings(api, monkeypatch):
    # TINY_SPEC's student and teacher, both cnn_tiny: 2 conv + 2 batch norm + 1 linear layer.
    with api.client() as c:
        monkeypatch.setattr(api.settings, "MAX_SPEC_LAYERS", 4)
        r = c.post("/v1/jobs", json=TINY_SPEC)
        assert _refusal(r, 422, "invalid_spec") == (
            "student.arch: 'cnn_tiny' builds 5 layers with weights; at most 4 are allowed"
        )
        monkeypatch.setattr(api.settings, "MAX_SPEC_LAYERS", 5)
        monkeypatch.setattr(api.settings, "MAX_SPEC_LIST_LENGTH", 1)
        r = c.post("/v1/jobs", json=TINY_SPEC)  # the student's widths: [8, 16]
        assert _refusal(r, 422, "invalid_spec").startswith("student.arch_kwargs.widths: a list")
        monkeypatch.setattr(api.settings, "MAX_SPEC_LIST_LENGTH", 2)
        assert c.post("/v1/jobs", json=TINY_SPEC).status_code == 201


# --- feature-loss layers, resolved at POST --------------------------------------------------


def _with_feature(student_layer: str, teacher_layer: str, teacher: dict | None = None) -> dict:
    spec = _spec(
        distill={
            "epochs": 1,
            "feature": {"student_layer": student_layer, "teacher_layer": teacher_layer},
        }
    )
    if teacher is not None:
        spec["teacher"] = teacher
    return spec


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_feature_layer_typo_is_refused_at_post_listing_the_layers(api, role):
    layers = {"student": "features.1", "teacher": "features.1", role: "features.7"}
    with api.client() as c:
        r = c.post("/v1/jobs", json=_with_feature(layers["student"], layers["teacher"]))
        assert _refusal(r, 422, "invalid_spec").startswith(
            f"distill.feature.{role}_layer: no layer 'features.7'; layers: features, "
            "features.0, features.0.0"
        )
        assert c.post("/v1/jobs", json=_with_feature("features.1", "features.1")).status_code == 201


def _safetensors_teacher(tmp_path) -> bytes:
    from worker.pipeline.archs import build_model
    from worker.pipeline.export import export_safetensors

    model = build_model("cnn_tiny", (1, 8, 8), 10)
    path = tmp_path / "t.safetensors"
    export_safetensors(model, path, arch="cnn_tiny", arch_kwargs={})
    return path.read_bytes()


def test_a_safetensors_upload_with_unbounded_arch_kwargs_is_refused(api, tmp_path):
    with api.client() as c:
        r = c.post(
            "/v1/models",
            files={"file": ("w.safetensors", _safetensors_teacher(tmp_path))},
            data={"arch": "mlp", "arch_kwargs": json.dumps({"hidden": [1] * 65})},
        )
    assert _refusal(r, 422, "invalid_upload") == (
        "arch_kwargs.hidden: a list of 65 items; at most 64 are allowed"
    )


def test_an_uploaded_teachers_layers_are_resolved_when_its_arch_is_known(api, tmp_path):
    with api.client() as c:
        r = c.post(
            "/v1/models",
            files={"file": ("t.safetensors", _safetensors_teacher(tmp_path))},
            data={"arch": "cnn_tiny"},
        )
        assert r.status_code == 201, r.text
        teacher = {"source": "upload", "id": r.json()["id"]}
        r = c.post("/v1/jobs", json=_with_feature("features.1", "features.5", teacher))
        assert _refusal(r, 422, "invalid_spec").startswith(
            "distill.feature.teacher_layer: no layer 'features.5'; layers: features"
        )
        r = c.post("/v1/jobs", json=_with_feature("features.1", "features.1", teacher))
        assert r.status_code == 201, r.text
