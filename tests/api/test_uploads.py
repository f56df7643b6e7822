import io
import zipfile

import numpy as np
import pytest
import torch

from tests.service_support import TINY_SPEC, post_declaring
from worker.pipeline.archs import build_model
from worker.pipeline.export import export_onnx, export_safetensors, export_torchscript


def _npz(x, y, **extra) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y, **extra)
    return buf.getvalue()


def _images(n=40, classes=4, shape=(1, 8, 8)):
    rng = np.random.default_rng(0)
    return rng.random((n, *shape), dtype=np.float32), np.arange(n) % classes


def test_npz_dataset_upload_records_its_metadata(api):
    x, y = _images()
    with api.client() as c:
        r = c.post(
            "/v1/datasets",
            files={"file": ("shapes.npz", _npz(x, y, classes=np.array(list("abcd"))))},
        )
        assert r.status_code == 201, r.text
        ds = r.json()
        assert ds["kind"] == "npz" and ds["num_samples"] == 40 and ds["num_classes"] == 4
        assert ds["input_shape"] == [1, 8, 8] and ds["class_names"] == ["a", "b", "c", "d"]
        assert c.get(f"/v1/datasets/{ds['id']}").json() == ds


def test_imagefolder_zip_upload(api, tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(3):
                img = io.BytesIO()
                Image.new("RGB", (12, 10), colour).save(img, format="PNG")
                zf.writestr(f"{cls}/{i}.png", img.getvalue())
    with api.client() as c:
        r = c.post("/v1/datasets", files={"file": ("pets.zip", buf.getvalue())})
        assert r.status_code == 201, r.text
        assert r.json()["class_names"] == ["cat", "dog"] and r.json()["num_samples"] == 6


@pytest.mark.parametrize(
    "name,payload,message",
    [
        ("bad.npz", b"not an npz", "not a readable .npz file"),
        ("objects.npz", None, "object arrays"),
        (
            "labels.npz",
            _npz(np.zeros((10, 4), np.float32), np.array([0, 1, 2, 5] * 2 + [0, 1])),
            "classes [3, 4] have no samples",
        ),
        ("nan.npz", _npz(np.full((10, 4), np.nan, np.float32), np.arange(10) % 2), "NaN"),
        ("slip.zip", None, "points outside the archive"),
        ("data.csv", b"a,b\n1,2\n", "expected a .npz file or an ImageFolder"),
    ],
)
def test_bad_datasets_are_refused_with_a_reason(api, name, payload, message):
    if name == "objects.npz":
        buf = io.BytesIO()
        np.savez(buf, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
        payload = buf.getvalue()
    if name == "slip.zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("../../evil/0.png", b"x")
        payload = buf.getvalue()
    with api.client() as c:
        r = c.post("/v1/datasets", files={"file": (name, payload)})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_upload" and message in r.json()["error"]["message"]


def test_oversized_upload_is_refused_before_the_body_is_read(api):
    """The server answers 413 from the headers alone: the client never sends the body."""
    r = post_declaring(
        api.url,
        "/v1/datasets",
        key=api.key("alice"),
        length=api.settings.MAX_UPLOAD_BYTES * 4,
        content_type="multipart/form-data; boundary=xyz",
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text


def test_a_body_that_grows_past_the_cap_is_cut_off(api, monkeypatch):
    monkeypatch.setattr(api.settings, "MAX_UPLOAD_BYTES", 200_000)

    def chunks():
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n\r\n'
        for _ in range(100):
            yield b"\0" * 10_000

    with api.client() as c:
        r = c.post(
            "/v1/datasets",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    model = build_model("cnn_tiny", (1, 8, 8), 4).eval()
    x = torch.randn(2, 1, 8, 8)
    return {
        "onnx": export_onnx(model, x, d / "t.onnx").read_bytes(),
        "torchscript": export_torchscript(model, x, d / "t.pt").read_bytes(),
        "safetensors": export_safetensors(
            model, d / "t.safetensors", arch="cnn_tiny", arch_kwargs={}
        ).read_bytes(),
    }


def test_model_uploads_are_inspected_not_run(api, teacher_files):
    with api.client() as c:
        onnx = c.post("/v1/models", files={"file": ("t.onnx", teacher_files["onnx"])}).json()
        assert (
            onnx["format"] == "onnx"
            and onnx["input_shape"] == [1, 8, 8]
            and onnx["num_classes"] == 4
        )
        ts = c.post(
            "/v1/models",
            files={"file": ("t.pt", teacher_files["torchscript"])},
            data={"input_shape": "1,8,8", "num_classes": "4"},
        ).json()
        assert ts["format"] == "torchscript" and ts["input_shape"] == [1, 8, 8]
        st = c.post(
            "/v1/models",
            files={"file": ("t.safetensors", teacher_files["safetensors"])},
            data={"arch": "cnn_tiny"},
        )
        assert st.status_code == 201 and st.json()["arch"] == "cnn_tiny"
        assert c.get(f"/v1/models/{onnx['id']}").json() == onnx
        no_arch = c.post(
            "/v1/models", files={"file": ("t.safetensors", teacher_files["safetensors"])}
        )
        assert (
            no_arch.status_code == 422
            and "arch: safetensors holds weights only" in no_arch.json()["error"]["message"]
        )


def test_pickled_models_are_refused(api):
    import pickle

    payload = pickle.dumps({"w": torch.zeros(2)})
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    with api.client() as c:
        for name, body in (
            ("m.pt", payload),
            ("m.pth", buf.getvalue()),
            ("m.onnx", payload),
            ("m.safetensors", payload),
            ("m.pkl", payload),
        ):
            r = c.post("/v1/models", files={"file": (name, body)})
            assert r.status_code == 422, (name, r.text)
            assert r.json()["error"]["code"] == "invalid_upload"


def test_a_job_whose_teacher_and_dataset_disagree_is_refused(api, teacher_files):
    x, y = _images(classes=3)
    with api.client() as c:
        ds = c.post("/v1/datasets", files={"file": ("three.npz", _npz(x, y))}).json()
        model = c.post("/v1/models", files={"file": ("t.onnx", teacher_files["onnx"])}).json()
        spec = {
            "dataset": {"source": "upload", "id": ds["id"]},
            "teacher": {"source": "upload", "id": model["id"]},
            "student": {"arch": "cnn_tiny"},
        }
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 422
        assert (
            r.json()["error"]["message"]
            == f"teacher.id: model {model['id']} predicts 4 classes; the dataset has 3"
        )
        rows = c.post(
            "/v1/datasets",
            files={"file": ("rows.npz", _npz(np.zeros((20, 6), np.float32), np.arange(20) % 4))},
        ).json()
        r = c.post("/v1/jobs", json={**spec, "dataset": {"source": "upload", "id": rows["id"]}})
        assert (
            r.status_code == 422
            and "takes input [1, 8, 8]; the dataset gives [6]" in r.json()["error"]["message"]
        )
        ok = {
            **spec,
            "dataset": {
                "source": "upload",
                "id": c.post("/v1/datasets", files={"file": ("four.npz", _npz(*_images()))}).json()[
                    "id"
                ],
            },
        }
        assert c.post("/v1/jobs", json=ok).status_code == 201


def _upload_rows(c, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x, y = rng.random((20, 1, 8, 8), dtype=np.float32), np.arange(20) % 2
        r = c.post("/v1/datasets", files={"file": (f"d{i}.npz", _npz(x, y))})
        assert r.status_code == 201, r.text
        out.append(r.json())
    return out


def test_datasets_list_newest_first_in_pages_filtered_by_sha256_per_tenant(api):
    with api.client("lister") as c:
        made = _upload_rows(c, 3, seed=1)
        first = c.get("/v1/datasets", params={"limit": 2}).json()
        assert [d["id"] for d in first["data"]] == [made[2]["id"], made[1]["id"]]
        assert first["has_more"] and first["next_after"] == made[1]["id"]
        rest = c.get("/v1/datasets", params={"limit": 2, "after": first["next_after"]}).json()
        assert [d["id"] for d in rest["data"]] == [made[0]["id"]] and not rest["has_more"]
        same = c.get("/v1/datasets", params={"sha256": made[1]["sha256"]}).json()["data"]
        assert [d["id"] for d in same] == [made[1]["id"]]
        r = c.get("/v1/datasets", params={"sha256": "xyz"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    with api.client("bob") as c:
        ids = {d["id"] for d in c.get("/v1/datasets", params={"limit": 200}).json()["data"]}
        assert not ids & {d["id"] for d in made}
        assert c.delete(f"/v1/datasets/{made[0]['id']}").status_code == 404


def test_a_dataset_a_live_job_uses_cannot_be_deleted_then_can(api):
    with api.client() as c:
        (ds,) = _upload_rows(c, 1, seed=2)
        folder = api.settings.storage_dir / "uploads"
        assert any(p.name == ds["id"] for p in folder.rglob(ds["id"]))
        spec = {**TINY_SPEC, "dataset": {"source": "upload", "id": ds["id"]}}
        job = c.post("/v1/jobs", json=spec).json()
        r = c.delete(f"/v1/datasets/{ds['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "upload_in_use"
        assert job["id"] in r.json()["error"]["message"]
        c.post(f"/v1/jobs/{job['id']}/cancel")
        assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 204
        assert c.get(f"/v1/datasets/{ds['id']}").status_code == 404
        assert not list(folder.rglob(ds["id"]))  # the file went with the row
        assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 404


def test_models_list_and_delete(api, tmp_path):
    model = build_model("mlp", (6,), 3).eval()
    export_onnx(model, torch.zeros(1, 6), tmp_path / "t.onnx")
    with api.client("modeller") as c:
        up = c.post("/v1/models", files={"file": ("t.onnx", (tmp_path / "t.onnx").read_bytes())})
        assert up.status_code == 201, up.text
        listed = c.get("/v1/models").json()
        assert [m["id"] for m in listed["data"]] == [up.json()["id"]]
        assert c.delete(f"/v1/models/{up.json()['id']}").status_code == 204
        assert c.get("/v1/models").json()["data"] == []


def test_a_finished_job_is_deleted_with_its_files_a_live_one_is_not(api):
    with api.client() as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        r = c.delete(f"/v1/jobs/{job['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_state_conflict"
        c.post(f"/v1/jobs/{job['id']}/cancel")
        folder = api.settings.storage_dir / "jobs" / job["id"]
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"x")  # what a worker would have left
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert not folder.exists()
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 404
