"""Resumable uploads on a local store, refusals that close their connection, the disk check,
the bomb check, and slow uploads that hold no database connection (issue 26)."""

import hashlib
import io
import socket
import threading
import time
import zipfile
from contextlib import ExitStack, suppress

import numpy as np
import pytest
from sqlalchemy import update

from app.core.storage import open_storage
from app.models import Dataset, UploadSession
from app.services.resumable import ExpireUploads
from tests.service_support import post_declaring

PART = 64 * 1024


@pytest.fixture
def small_parts(api, monkeypatch):
    monkeypatch.setattr(api.settings, "MIN_UPLOAD_PART_BYTES", PART)


def _npz_bytes(n: int = 600, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, x=rng.random((n, 1, 8, 8), dtype=np.float32), y=np.arange(n) % 5)
    return buf.getvalue()


def _create(c, data: bytes, name: str = "big.npz", **extra):
    body = {"kind": "dataset", "filename": name, "bytes": len(data), "part_bytes": PART, **extra}
    r = c.post("/v1/uploads", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def _put(c, upload_id: str, number: int, data: bytes):
    chunk = data[(number - 1) * PART : number * PART]
    return c.put(f"/v1/uploads/{upload_id}/parts/{number}", content=chunk)


def _raw(url: str, head: str, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head.encode() + body)
    return sock


def _cut_part(api, upload_id: str, number: int, data: bytes) -> None:
    """Send half of a part, then cut the connection, as a client whose network dropped."""
    chunk = data[(number - 1) * PART : number * PART]
    head = (
        f"PUT /v1/uploads/{upload_id}/parts/{number} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {api.key('alice')}\r\nContent-Length: {len(chunk)}\r\n\r\n"
    )
    sock = _raw(api.url, head, chunk[: len(chunk) // 2])
    sock.close()


def test_a_cut_upload_is_resumed_and_completes_into_the_same_dataset(api, small_parts):
    data = _npz_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with api.client() as c:
        up = _create(c, data, sha256=digest)
        total = up["parts_total"]
        assert total == -(-len(data) // PART) and up["parts"] == [] and up["part_urls"] is None
        for n in (1, 2):
            assert _put(c, up["id"], n, data).json() == {"number": n, "bytes": PART}
        _cut_part(api, up["id"], 3, data)
        # The server says what it has: the cut part is not among them.
        seen = c.get(f"/v1/uploads/{up['id']}").json()
        assert [p["number"] for p in seen["parts"]] == [1, 2]
        r = c.post(f"/v1/uploads/{up['id']}/complete")
        assert r.status_code == 409 and "lacks" in r.json()["error"]["message"]
        _put(c, up["id"], 1, data)  # sent again after all: replaces, harmless
        for n in range(3, total + 1):
            assert _put(c, up["id"], n, data).status_code == 200
        r = c.post(f"/v1/uploads/{up['id']}/complete")
        assert r.status_code == 201, r.text
        ds = r.json()
        assert ds["sha256"] == digest and ds["bytes"] == len(data)
        assert (
            ds["num_samples"] == 600 and ds["num_classes"] == 5 and ds["input_shape"] == [1, 8, 8]
        )
        assert c.get(f"/v1/datasets/{ds['id']}").json() == ds
        # The answer was lost? Completing again gives the same dataset.
        assert c.post(f"/v1/uploads/{up['id']}/complete").json()["id"] == ds["id"]
        # And the bytes stored are the bytes sent.
    with api.db.session() as s:
        key = s.get(Dataset, ds["id"]).path
    assert open_storage(api.settings).local_path(key).read_bytes() == data


def test_a_checksum_mismatch_discards_the_upload(api, small_parts):
    data = _npz_bytes(n=100)
    with api.client() as c:
        up = _create(c, data, sha256="0" * 64)
        for n in range(1, up["parts_total"] + 1):
            _put(c, up["id"], n, data)
        r = c.post(f"/v1/uploads/{up['id']}/complete")
        assert r.status_code == 422 and "sha256" in r.json()["error"]["message"]
        assert c.get(f"/v1/uploads/{up['id']}").status_code == 404


def test_a_part_of_the_wrong_size_is_not_recorded(api, small_parts):
    data = _npz_bytes()
    with api.client() as c:
        up = _create(c, data)
        r = c.put(f"/v1/uploads/{up['id']}/parts/1", content=data[:100])
        assert r.status_code == 422 and f"{PART} bytes" in r.json()["error"]["message"]
        r = c.put(f"/v1/uploads/{up['id']}/parts/99", content=data[:PART])
        assert r.status_code == 422
        assert c.get(f"/v1/uploads/{up['id']}").json()["parts"] == []
        assert c.delete(f"/v1/uploads/{up['id']}").status_code == 204
        assert c.get(f"/v1/uploads/{up['id']}").status_code == 404


def test_another_tenant_cannot_see_or_feed_an_upload(api, small_parts):
    data = _npz_bytes(n=100)
    with api.client() as c, api.client("bob") as other:
        up = _create(c, data)
        assert other.get(f"/v1/uploads/{up['id']}").status_code == 404
        assert _put(other, up["id"], 1, data).status_code == 404
        assert other.post(f"/v1/uploads/{up['id']}/complete").status_code == 404


def test_sizes_over_the_limit_and_a_full_disk_are_refused_before_any_part(api, monkeypatch):
    with api.client() as c:
        big = {"kind": "dataset", "filename": "huge.npz", "bytes": 21 * 1024**3}
        r = c.post("/v1/uploads", json=big)
        assert r.status_code == 413 and "21" in r.json()["error"]["message"]
        r = c.post("/v1/uploads", json={**big, "filename": "notes.txt", "bytes": 10})
        assert r.status_code == 422
        # The operator keeps more free than the disk has: any upload is a 507, before writing.
        monkeypatch.setattr(api.settings, "UPLOAD_DISK_RESERVE_BYTES", 1 << 62)
        r = c.post("/v1/uploads", json={**big, "bytes": 10 * 1024**2})
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage"
    r = post_declaring(
        api.url,
        "/v1/datasets",
        key=api.key("alice"),
        length=1000,
        content_type="multipart/form-data; boundary=x",
    )
    assert r.status_code == 507 and r.headers["connection"] == "close"


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (after its answer) within `seconds`."""
    sock.settimeout(seconds)
    with suppress(socket.timeout):
        while chunk := sock.recv(65536):
            del chunk
        return True
    return False


def test_a_refused_upload_closes_the_connection_instead_of_reading_the_body(api):
    """Content-Length: 1e9 on POST /v1/datasets used to get a 413 and then have all 954 MiB
    read and discarded: the connection now closes after the answer."""
    head = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.key('alice')}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 1000000000\r\n\r\n"
    )
    with _raw(api.url, head, b"--x\r\n") as sock:
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()
        assert _closed_within(sock, 5)


def test_a_stalled_body_times_out_with_408(api, small_parts, monkeypatch):
    monkeypatch.setattr(api.settings, "UPLOAD_READ_TIMEOUT_SECONDS", 0.5)
    data = _npz_bytes()
    with api.client() as c:
        up = _create(c, data)
    head = (
        f"PUT /v1/uploads/{up['id']}/parts/1 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {api.key('alice')}\r\nContent-Length: {PART}\r\n\r\n"
    )
    with _raw(api.url, head, b"abc") as sock:
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert _closed_within(sock, 5)


def test_an_archive_bomb_is_refused_from_its_headers_before_anything_is_written(api):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.png", b"\0" * (100 * 1024**2))
        zf.writestr("b/zeros.png", b"\0" * 1024)
    assert len(buf.getvalue()) < 200 * 1024  # ~100 KB expanding to 100 MiB: ~1000x
    tmp = open_storage(api.settings).tmp_dir()
    before = set(tmp.rglob("*"))
    with api.client() as c:
        r = c.post("/v1/datasets", files={"file": ("bomb.zip", buf.getvalue())})
    assert r.status_code == 422 and "archive bomb" in r.json()["error"]["message"], r.text
    assert set(tmp.rglob("*")) <= before


def test_expired_uploads_are_swept(api, small_parts):
    data = _npz_bytes(n=100)
    storage = open_storage(api.settings)
    with api.client() as c:
        up = _create(c, data)
        _put(c, up["id"], 1, data)
        folder = storage.tmp_dir() / "resumable" / up["id"]
        assert folder.is_dir()
        with api.db.session() as s:
            s.execute(
                update(UploadSession)
                .where(UploadSession.id == up["id"])
                .values(expires_at=UploadSession.created_at)
            )
        assert ExpireUploads(api.db, storage)()["expired_upload_sessions"] >= 1
        assert c.get(f"/v1/uploads/{up['id']}").status_code == 404
        assert not folder.exists()


def _trickle(api, stop: threading.Event, opened: list) -> None:
    head = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.key('alice')}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
    )
    with ExitStack() as stack:
        part = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.npz"\r\n\r\n'
        sock = stack.enter_context(_raw(api.url, head, part))
        opened.append(sock)
        while not stop.wait(0.2):  # a byte every 0.2 s, for as long as the test needs
            with suppress(OSError):
                sock.sendall(b"a")


def test_slow_uploads_do_not_block_another_tenants_requests(api):
    """Issue 26: 16 uploads sending a byte a second held 16 pooled sessions while their bodies
    trickled in, and another tenant's GET /v1/jobs waited 30 s for a connection, then got a
    500. Uploads now hold none while receiving: more slow uploads than the pool has
    connections (15 on SQLite, 30 on PostgreSQL) leave the others' requests answered."""
    stop, opened = threading.Event(), []
    threads = [
        threading.Thread(target=_trickle, args=(api, stop, opened), daemon=True) for _ in range(40)
    ]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 10
        while len(opened) < len(threads) and time.time() < deadline:
            time.sleep(0.05)
        # Requests for a few seconds while the uploads trickle: a starved pool answers none
        # of them before its 30 s timeout.
        with api.client("bob") as other:
            other.timeout = 10
            until = time.time() + 3
            while time.time() < until:
                assert other.get("/v1/jobs?limit=1").status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


def test_a_tenant_holds_only_so_many_unfinished_uploads(api, small_parts, monkeypatch):
    monkeypatch.setattr(api.settings, "MAX_OPEN_UPLOADS", 2)
    data = _npz_bytes(n=100)
    with api.client("hoarder") as c:
        first, _ = _create(c, data), _create(c, data)
        r = c.post("/v1/uploads", json={"kind": "dataset", "filename": "c.npz", "bytes": 10})
        assert r.status_code == 409 and "unfinished uploads" in r.json()["error"]["message"]
        assert c.delete(f"/v1/uploads/{first['id']}").status_code == 204
        assert _create(c, data)["status"] == "open"
