"""Every route keeps tenants apart: another tenant's things are 404, no key or a revoked key 401."""

import io

import numpy as np
import pytest

from app.services import tenants
from tests.service_support import TINY_SPEC

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def owned(api):
    """Things tenant 'owner' has: a job, a dataset, a model."""
    import torch

    from worker.pipeline.archs import build_model
    from worker.pipeline.export import export_onnx

    with api.client("owner") as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        buf = io.BytesIO()
        np.savez(buf, x=np.zeros((8, 3), np.float32), y=np.arange(8) % 2)
        ds = c.post("/v1/datasets", files={"file": ("d.npz", buf.getvalue())}).json()
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(
                build_model("mlp", (3,), 2).eval(), torch.zeros(1, 3), Path(tmp) / "m.onnx"
            )
            model = c.post("/v1/models", files={"file": ("m.onnx", path.read_bytes())}).json()
        # A loopback receiver needs the operator's settings (read per request).
        api.settings.WEBHOOK_ALLOW_HTTP = api.settings.WEBHOOK_ALLOW_PRIVATE = True
        try:
            hook = c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}).json()
        finally:
            api.settings.WEBHOOK_ALLOW_HTTP = api.settings.WEBHOOK_ALLOW_PRIVATE = False
    return {"job": job["id"], "dataset": ds["id"], "model": model["id"], "webhook": hook["id"]}


ROUTES = [
    ("GET", "/v1/jobs/{job}"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("GET", "/v1/jobs/{job}/events"),
    ("GET", "/v1/jobs/{job}/artifacts"),
    ("GET", "/v1/jobs/{job}/artifacts/model.onnx"),
    ("GET", "/v1/jobs/{job}/history"),
    ("GET", "/v1/jobs/{job}/webhook-deliveries"),
    ("DELETE", "/v1/jobs/{job}"),
    ("GET", "/v1/datasets/{dataset}"),
    ("DELETE", "/v1/datasets/{dataset}"),
    ("GET", "/v1/models/{model}"),
    ("DELETE", "/v1/models/{model}"),
    ("GET", "/v1/webhooks/{webhook}/deliveries"),
    ("DELETE", "/v1/webhooks/{webhook}"),
]


@pytest.mark.parametrize("method,route", ROUTES)
def test_another_tenant_gets_404(api, owned, method, route):
    with api.client("intruder") as c:
        r = c.request(method, route.format(**owned))
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"].endswith("not_found")


def test_another_tenant_sees_none_of_it_in_lists_or_specs(api, owned):
    with api.client("intruder") as c:
        assert all(
            j["id"] != owned["job"] for j in c.get("/v1/jobs", params={"limit": 200}).json()["data"]
        )
        assert c.get("/v1/jobs", params={"after": owned["job"]}).status_code == 404
        r = c.post(
            "/v1/jobs", json={**TINY_SPEC, "dataset": {"source": "upload", "id": owned["dataset"]}}
        )
        assert (
            r.status_code == 422
            and f"no dataset {owned['dataset']!r}" in r.json()["error"]["message"]
        )
        r = c.post(
            "/v1/jobs", json={**TINY_SPEC, "teacher": {"source": "upload", "id": owned["model"]}}
        )
        assert (
            r.status_code == 422 and f"no model {owned['model']!r}" in r.json()["error"]["message"]
        )
        for kind in ("datasets", "models", "webhooks"):
            listed = c.get(f"/v1/{kind}").json()["data"]
            assert owned[kind[:-1]] not in {x["id"] for x in listed}, kind
    with api.client("owner") as c:  # and the owner still has it all
        assert c.get(f"/v1/jobs/{owned['job']}").status_code == 200
        assert c.get(f"/v1/datasets/{owned['dataset']}").status_code == 200
        assert [h["id"] for h in c.get("/v1/webhooks").json()["data"]] == [owned["webhook"]]


ALL_ROUTES = ROUTES + [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models"),
    ("POST", "/v1/webhooks"),
    ("GET", "/v1/webhooks"),
    ("GET", "/v1/webhooks/default/secret"),
]


@pytest.mark.parametrize("method,route", ALL_ROUTES)
def test_no_key_or_a_revoked_key_gets_401(api, owned, method, route):
    path = route.format(**owned)
    with api.client(None) as c:
        r = c.request(method, path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
        r = c.request(method, path, headers={"Authorization": "Bearer dk_wrong"})
        assert r.status_code == 401
    with api.db.session() as s:
        key = tenants.create_key(s, tenant_name="owner")
    with api.db.session() as s:
        assert tenants.revoke_key(s, key=key)
    with api.client(None) as c:
        assert (
            c.request(method, path, headers={"Authorization": f"Bearer {key}"}).status_code == 401
        )


def test_keys_are_stored_hashed(api):
    from sqlalchemy import select

    from app.models import ApiKey

    key = api.key("alice")
    with api.db.session() as s:
        stored = list(s.scalars(select(ApiKey.key_hash)))
    assert key not in stored and tenants.hash_key(key) in stored
