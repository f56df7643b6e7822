"""An artifact streamed from a bucket store (`?redirect=false`, DOWNLOAD_MODE=stream): the
byte ranges a client asks for, as RFC 9110 has them. The bytes come through Storage.stream,
here a local folder's."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from app.api.downloads import from_store
from app.core.config import Settings
from app.core.storage import LocalStorage

BODY = bytes(range(256)) * 4  # 1,024 bytes
ETAG = '"' + "ab" * 32 + '"'


def _get(tmp_path, range_header=None, if_range=None):
    storage = LocalStorage(tmp_path)
    (tmp_path / "jobs" / "j").mkdir(parents=True)
    (tmp_path / "jobs" / "j" / "model.onnx").write_bytes(BODY)
    artifact = SimpleNamespace(
        path="jobs/j/model.onnx", name="model.onnx", bytes=len(BODY), sha256="ab" * 32
    )
    reply = from_store(
        storage,
        Settings(DOWNLOAD_MODE="stream"),
        artifact,
        redirect=True,
        range_header=range_header,
        if_range=if_range,
        media_type="application/octet-stream",
    )
    return reply.status_code, reply.headers, asyncio.run(_body(reply))


async def _body(reply) -> bytes:
    if not hasattr(reply, "body_iterator"):  # a plain Response (416)
        return reply.body
    return b"".join([chunk async for chunk in reply.body_iterator])


@pytest.mark.parametrize(
    "range_header,if_range,status,span",
    [
        (None, None, 200, (0, 1023)),
        ("bytes=10-19", None, 206, (10, 19)),
        ("bytes=1000-", None, 206, (1000, 1023)),
        ("bytes=-24", None, 206, (1000, 1023)),
        ("bytes=1000-5000", None, 206, (1000, 1023)),
        ("bytes=10-19", ETAG, 206, (10, 19)),
        ("bytes=10-19", '"another"', 200, (0, 1023)),  # the file changed: all of it
        ("bytes=0-1,5-9", None, 200, (0, 1023)),  # several ranges: sent whole
    ],
)
def test_a_streamed_artifact_honours_range_and_if_range(
    tmp_path, range_header, if_range, status, span
):
    got, headers, body = _get(tmp_path, range_header, if_range)
    first, last = span
    assert got == status and body == BODY[first : last + 1]
    assert headers["etag"] == ETAG and headers["content-length"] == str(last - first + 1)
    if status == 206:
        assert headers["content-range"] == f"bytes {first}-{last}/1024"


def test_a_range_past_the_end_is_416_naming_the_size(tmp_path):
    got, headers, body = _get(tmp_path, "bytes=2000-")
    assert got == 416 and headers["content-range"] == "bytes */1024" and body == b""
