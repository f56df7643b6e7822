"""Resumable uploads on a bucket store (moto_server on loopback): the client sends the parts
straight to the bucket with presigned part URLs, the API only creates, lists and completes
the S3 multipart upload; a cut upload resumes without its finished parts."""

from __future__ import annotations

import hashlib
import io
import uuid

import httpx
import numpy as np
import pytest

from app.core.config import Settings
from app.main import create_app
from app.services import tenants
from distillery.client import Client
from tests.e2e.test_object_store import BUCKET, s3  # noqa: F401  (the moto_server fixture)
from tests.service_support import ThreadServer

PART = 5 * 1024**2  # S3's smallest part


class BucketCounter(httpx.HTTPTransport):
    """Counts the bytes PUT to presigned part URLs; `fail` cuts a part's PUTs that often."""

    def __init__(self, fail: dict[int, int] | None = None) -> None:
        super().__init__()
        self.fail = dict(fail or {})
        self.sent: list[tuple[int, int]] = []
        self.api_parts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and "partNumber" in request.url.params:
            assert "authorization" not in request.headers  # the API key never goes to a bucket
            number = int(request.url.params["partNumber"])
            if self.fail.get(number, 0) > 0:
                self.fail[number] -= 1
                raise httpx.WriteError("connection cut", request=request)
            self.sent.append((number, len(request.content)))
        elif request.method == "PUT":
            self.api_parts += 1
        return super().handle_request(request)


@pytest.fixture(scope="module")
def bucket_api(s3, tmp_path_factory):  # noqa: F811
    prefix = f"resumable-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        DISTILLERY_HOME=tmp_path_factory.mktemp("bucket-api"),
        STORAGE_URL=f"s3://{BUCKET}/{prefix}",
        S3_ENDPOINT_URL=s3.url,
        S3_ACCESS_KEY_ID="testing",
        S3_SECRET_ACCESS_KEY="testing",
        DEFAULT_QUEUE=f"test-{uuid.uuid4().hex[:8]}",
        REAPER_INTERVAL_SECONDS=3600,
    )
    app = create_app(settings)
    with ThreadServer(app) as server:
        with app.state.db.session() as session:
            key = tenants.create_key(session, tenant_name="alice")
        yield server.url, key, prefix


@pytest.fixture
def big_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(2)
    buf = io.BytesIO()
    # ~11 MiB of noise: three parts of 5, 5 and ~1 MiB
    np.savez(buf, x=rng.random((2800, 1, 32, 32), dtype=np.float32), y=np.arange(2800) % 4)
    path = tmp_path / "noise.npz"
    path.write_bytes(buf.getvalue())
    return path


def _client(bucket_api, transport, retries: int = 3) -> Client:
    url, key, _ = bucket_api
    return Client(url, key, transport=transport, retries=retries, sleep=lambda s: None)


def test_parts_go_straight_to_the_bucket_and_a_cut_upload_resumes(s3, bucket_api, big_npz):  # noqa: F811
    size = big_npz.stat().st_size
    assert size > 2 * PART
    cut = BucketCounter({2: 99})
    with _client(bucket_api, cut, retries=1) as c, pytest.raises(httpx.TransportError):
        c.upload_dataset(big_npz, resumable=True, part_bytes=PART)
    assert [n for n, _ in cut.sent] == [1]
    again = BucketCounter()
    with _client(bucket_api, again) as c:
        ds = c.upload_dataset(big_npz, resumable=True, part_bytes=PART)
    assert [n for n, _ in again.sent] == [2, 3]
    assert sum(b for _, b in again.sent) == size - PART  # part 1 not sent again
    assert cut.api_parts == again.api_parts == 0  # no part through the API
    digest = hashlib.sha256(big_npz.read_bytes()).hexdigest()
    assert ds.sha256 == digest and ds.num_samples == 2800 and ds.input_shape == [1, 32, 32]
    # The object the bucket assembled is the dataset's file, byte for byte.
    _, _, prefix = bucket_api
    objects = s3.objects(prefix)
    stored = [k for k in objects if k.endswith(f"/datasets/{ds.id}/noise.npz")]
    assert len(stored) == 1 and hashlib.sha256(objects[stored[0]]).hexdigest() == digest
    pending = s3.client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    assert pending.get("Uploads", []) == []


def test_an_aborted_upload_leaves_no_parts_in_the_bucket(s3, bucket_api, big_npz):  # noqa: F811
    url, key, prefix = bucket_api
    body = {"kind": "dataset", "filename": "x.npz", "bytes": 2 * PART, "part_bytes": PART}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        up = c.post("/v1/uploads", json=body).json()
        assert sorted(up["part_urls"]) == ["1", "2"]
        assert httpx.put(up["part_urls"]["1"], content=b"\1" * PART).status_code == 200
        assert [p["number"] for p in c.get(f"/v1/uploads/{up['id']}").json()["parts"]] == [1]
        r = c.put(f"/v1/uploads/{up['id']}/parts/2", content=b"\1" * PART)
        assert r.status_code == 409 and "part_urls" in r.json()["error"]["message"]
        assert c.delete(f"/v1/uploads/{up['id']}").status_code == 204
    pending = s3.client.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    assert pending.get("Uploads", []) == []
