"""Artifact downloads carry the Content-Type of what they hold, from the local folder, streamed
from a bucket, and behind a presigned URL: a browser shows pareto.png instead of saving an
octet-stream, a script reads report.json as JSON."""

from __future__ import annotations

import asyncio
import hashlib
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from app.api.downloads import from_store, media_type
from app.core.config import Settings
from app.core.storage import LocalStorage, S3Storage
from app.jobs import lifecycle
from app.jobs.states import JobStatus
from app.models import utcnow
from distillery import Client
from tests.service_support import TINY_SPEC

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 8
TYPES = {
    "model.onnx": ("onnx", b"\x08\x07onnx", "application/octet-stream"),
    "model.int8.onnx": ("onnx", b"\x08\x07int8", "application/octet-stream"),
    "model.torchscript.pt": ("pt", b"PK\x03\x04", "application/octet-stream"),
    "model.safetensors": ("safetensors", b"\x08\0\0\0\0\0\0\0{}      ", "application/octet-stream"),
    "pareto.png": ("png", PNG, "image/png"),
    "report.json": ("json", b"{}", "application/json"),
    "model_card.json": ("json", b"{}", "application/json"),
    "history.csv": ("csv", b"stage,run\n", "text/csv"),
}


def finished_job(
    api,
    c,
    files: dict[str, tuple[str, bytes]],
    history: list[dict] | None = None,
    **artifact_fields,
) -> str:
    """A job run as a worker runs one: claimed, its files written, finished with them as its
    artifacts (`artifact_fields`: name -> extra columns of that artifact's row) and `history`
    as its epochs."""
    job_id = c.post("/v1/jobs", json=TINY_SPEC).json()["id"]
    with api.db.session() as s:
        assert lifecycle.claim(
            s, job_id=job_id, worker_id="w/1", stale_before=utcnow(), max_attempts=3
        )
    artifacts = []
    for name, (fmt, data) in files.items():
        path = api.settings.storage_dir / "jobs" / job_id / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        row = {"name": name, "format": fmt, "bytes": len(data), "path": f"jobs/{job_id}/{name}"}
        row["sha256"] = hashlib.sha256(data).hexdigest()
        artifacts.append({**row, **artifact_fields.get(name, {})})
    with api.db.session() as s:
        assert lifecycle.finish(
            s,
            job_id=job_id,
            worker_id="w/1",
            status=JobStatus.SUCCEEDED,
            artifacts=artifacts,
            history=history,
        )
    return job_id


def test_each_artifact_is_served_with_its_content_type(api):
    with api.client("types") as c:
        job_id = finished_job(api, c, {n: (f, d) for n, (f, d, _) in TYPES.items()})
        for name, (_, data, expected) in TYPES.items():
            r = c.get(f"/v1/jobs/{job_id}/artifacts/{name}")
            assert r.status_code == 200 and r.content == data
            assert r.headers["content-type"].split(";")[0] == expected, name


@pytest.mark.parametrize("name", ["pareto.png", "report.json", "model.onnx"])
def test_a_streamed_artifact_has_its_content_type(tmp_path, name):
    """From a bucket through the API (DOWNLOAD_MODE=stream), here a local folder's bytes."""
    _, data, expected = TYPES[name]
    (tmp_path / "jobs" / "j").mkdir(parents=True)
    (tmp_path / "jobs" / "j" / name).write_bytes(data)
    artifact = SimpleNamespace(path=f"jobs/j/{name}", name=name, bytes=len(data), sha256="ab")
    reply = from_store(
        LocalStorage(tmp_path),
        Settings(DOWNLOAD_MODE="stream"),
        artifact,
        redirect=True,
        range_header=None,
        if_range=None,
        media_type=media_type(name),
    )
    assert reply.headers["content-type"].split(";")[0] == expected
    assert asyncio.run(_body(reply)) == data


async def _body(reply) -> bytes:
    return b"".join([chunk async for chunk in reply.body_iterator])


def test_a_presigned_url_names_the_content_type(tmp_path):
    """The bucket answers the presigned URL itself: the URL must ask it for the type (the
    objects are stored without one). Presigning is local: no store is contacted."""
    settings = Settings(
        DISTILLERY_HOME=tmp_path,
        S3_ENDPOINT_URL="http://127.0.0.1:9",
        S3_ACCESS_KEY_ID="k",
        S3_SECRET_ACCESS_KEY="s",
    )
    storage = S3Storage("s3://bucket/prefix", settings)
    artifact = SimpleNamespace(path="jobs/j/pareto.png", name="pareto.png", bytes=16, sha256="ab")
    reply = from_store(
        storage,
        settings,
        artifact,
        redirect=True,
        range_header=None,
        if_range=None,
        media_type="image/png",
    )
    assert reply.status_code == 307
    query = parse_qs(urlsplit(reply.headers["location"]).query)
    assert query["response-content-type"] == ["image/png"]


def test_the_final_model_has_a_stable_download(api, tmp_path):
    """Whichever file holds the final model (here the float one: int8 lost), the listing
    marks it, /artifacts/final serves it under its own name, and the client's download
    fetches it by default."""
    files = {n: (f, d) for n, (f, d, _) in TYPES.items() if n != "pareto.png"}
    with api.client("final") as c:
        job_id = finished_job(api, c, files, **{"model.onnx": {"final": True}})
        listed = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        assert [a["name"] for a in listed if a["final"]] == ["model.onnx"]
        assert all(a["final"] is False for a in listed if a["name"] != "model.onnx")
        r = c.get(f"/v1/jobs/{job_id}/artifacts/final")
        assert r.status_code == 200 and r.content == TYPES["model.onnx"][1]
        assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
        assert 'filename="model.onnx"' in r.headers["content-disposition"]
        ranged = c.get(f"/v1/jobs/{job_id}/artifacts/final", headers={"Range": "bytes=2-"})
        assert ranged.status_code == 206 and ranged.content == TYPES["model.onnx"][1][2:]
        with Client(api.url, api.key("final")) as client:
            path = client.download(job_id, dest=tmp_path)
        assert path == tmp_path / "model.onnx" and path.read_bytes() == TYPES["model.onnx"][1]


def test_a_job_without_a_final_model_says_so(api):
    with api.client("final") as c:
        job_id = c.post("/v1/jobs", json=TINY_SPEC).json()["id"]  # queued: nothing yet
        r = c.get(f"/v1/jobs/{job_id}/artifacts/final")
        assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_not_found"
        assert "no final model" in r.json()["error"]["message"]
    with api.client("someone-else") as other:  # another tenant's job: not found either
        assert other.get(f"/v1/jobs/{job_id}/artifacts/final").status_code == 404
