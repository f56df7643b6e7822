"""Receive a multipart upload to a temporary file with the size cap enforced before and while
the body is read: a declared Content-Length over the cap is refused without reading a byte,
and a body that grows past it (chunked, or lying) is cut off at the cap."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.core.errors import PayloadTooLarge, UploadInvalid

MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file


@dataclass
class Received:
    path: Path
    filename: str
    fields: dict[str, str]


def check_declared_length(request: Request, max_bytes: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MULTIPART_SLACK:
        raise PayloadTooLarge(f"upload of {int(declared)} bytes is over the {max_bytes} byte limit")


async def _capped(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes + MULTIPART_SLACK:
            raise PayloadTooLarge(f"upload is over the {max_bytes} byte limit")
        yield chunk


async def receive_file(request: Request, *, max_bytes: int, tmp_dir: Path) -> Received:
    check_declared_length(request, max_bytes)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadInvalid(
            "send the file as multipart/form-data in a field named 'file' (curl -F file=@PATH)"
        )
    parser = MultiPartParser(
        request.headers, _capped(request, max_bytes), max_files=1, max_fields=20
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise UploadInvalid(f"malformed multipart body: {e.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise UploadInvalid("no file: send it in a multipart field named 'file'")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    path = Path(name)
    try:
        with open(fd, "wb") as out:
            await upload.seek(0)
            shutil.copyfileobj(upload.file, out, 1 << 20)
        if path.stat().st_size > max_bytes:
            raise PayloadTooLarge(f"file is over the {max_bytes} byte limit")
        if path.stat().st_size == 0:
            raise UploadInvalid("the uploaded file is empty")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        await upload.close()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    return Received(path=path, filename=upload.filename or "upload", fields=fields)


@asynccontextmanager
async def uploaded_file(
    request: Request, *, max_bytes: int, tmp_dir: Path
) -> AsyncIterator[Received]:
    """`receive_file`, with the temporary file removed when the block ends, whatever happens
    (the service moves it into storage when it accepts the upload)."""
    received = await receive_file(request, max_bytes=max_bytes, tmp_dir=tmp_dir)
    try:
        yield received
    finally:
        received.path.unlink(missing_ok=True)
