"""Receiving upload bodies: a multipart file (POST /v1/datasets, /v1/models) or one part of a
resumable upload (PUT /v1/uploads/{id}/parts/{n}).

What every upload route keeps to:
- no pooled database session while the body arrives: the caller is authenticated in a session
  of its own that is closed before the first byte is read (`UploadTenantDep`); the route opens
  another to write once the body is in (16 clients sending a byte a second used to hold 16
  connections and starve everyone else's requests);
- a size cap before and while the body is read: a declared Content-Length over it is refused
  without reading a byte, a body that grows past it is cut off at the cap;
- a disk check before writing: a file the API's disk cannot hold (with UPLOAD_DISK_RESERVE_BYTES
  to spare) is a 507, and so is a disk that fills while writing;
- a read timeout: a client that sends nothing for UPLOAD_READ_TIMEOUT_SECONDS gets a 408.
A refusal answers with `Connection: close` and reads no more of the body
(app/core/body_limit.py `close_if_unread`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from anyio import to_thread
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.api.deps import TenantDep
from app.core.disk import disk_full_is_507, ensure_disk
from app.core.errors import PayloadTooLarge, UploadInvalid, UploadTimeout

MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file
WRITE_BYTES = 1 << 20  # bytes gathered before each write to disk (in a worker thread)
T = TypeVar("T")


# The caller's tenant, authenticated in a session of its own that is closed before the
# route reads a byte of the body (app/api/deps.py); counted against TENANT_MAX_REQUESTS.
UploadTenantDep = TenantDep


def declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


async def body_chunks(request: Request, timeout: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; 408 when nothing came for `timeout` seconds."""
    stream = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadTimeout(f"no bytes of the body for {timeout:g} s; send it again") from None
        yield chunk


async def in_session(request: Request, fn: Callable[..., T], /, **kwargs: Any) -> T:
    """`fn(session, **kwargs)` in a worker thread, in a session of its own that commits when
    it returns: the database work of an upload route, before or after its body."""

    def run() -> T:
        with request.app.state.db.session() as session:
            return fn(session, **kwargs)

    return await to_thread.run_sync(run)


# --- a multipart file --------------------------------------------------------------------------


@dataclass
class Received:
    path: Path
    filename: str
    fields: dict[str, str]


async def _capped(chunks: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > max_bytes + MULTIPART_SLACK:
            raise PayloadTooLarge(_too_large(max_bytes))
        yield chunk


def _too_large(max_bytes: int, declared: int | None = None) -> str:
    what = f"upload of {declared} bytes is" if declared is not None else "upload is"
    return (
        f"{what} over the {max_bytes} byte limit of one request; larger files go in parts "
        "(POST /v1/uploads; the CLI and the Python client do it by themselves)"
    )


def _check_request(request: Request, *, max_bytes: int, tmp_dir: Path, reserve: int) -> None:
    declared = declared_length(request)
    if declared is not None and declared > max_bytes + MULTIPART_SLACK:
        raise PayloadTooLarge(_too_large(max_bytes, declared))
    # The body is spooled once by the parser and copied once here: twice its size at most.
    ensure_disk(tmp_dir, 2 * (declared or 0), reserve)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadInvalid(
            "send the file as multipart/form-data in a field named 'file' (curl -F file=@PATH)"
        )


async def receive_file(
    request: Request, *, max_bytes: int, tmp_dir: Path, reserve: int = 0, timeout: float = 60.0
) -> Received:
    _check_request(request, max_bytes=max_bytes, tmp_dir=tmp_dir, reserve=reserve)
    body = _capped(body_chunks(request, timeout), max_bytes)
    parser = MultiPartParser(request.headers, body, max_files=1, max_fields=20)
    try:
        with disk_full_is_507():
            form = await parser.parse()
    except MultiPartException as e:
        raise UploadInvalid(f"malformed multipart body: {e.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise UploadInvalid("no file: send it in a multipart field named 'file'")
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-")
    path = Path(name)
    try:
        with open(fd, "wb") as out, disk_full_is_507():
            await upload.seek(0)
            await to_thread.run_sync(shutil.copyfileobj, upload.file, out, 1 << 20)
        if path.stat().st_size > max_bytes:
            raise PayloadTooLarge(_too_large(max_bytes))
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
async def uploaded_file(request: Request, **kwargs: Any) -> AsyncIterator[Received]:
    """`receive_file`, with the temporary file removed when the block ends, whatever happens
    (the service moves it into storage when it accepts the upload)."""
    received = await receive_file(request, **kwargs)
    try:
        yield received
    finally:
        received.path.unlink(missing_ok=True)


# --- one part of a resumable upload ------------------------------------------------------------


async def receive_part(
    request: Request, *, path: Path, offset: int, length: int, timeout: float
) -> None:
    """Write the body, which must be exactly `length` bytes, into `path` at `offset` (the
    file was allocated whole when the upload was created). A short or long body is a 422 and
    leaves the part unrecorded."""
    declared = declared_length(request)
    if declared is not None and declared != length:
        raise UploadInvalid(f"this part is {length} bytes; the request declares {declared}")
    written, pending = 0, bytearray()
    fd = os.open(path, os.O_WRONLY)
    try:
        with disk_full_is_507():
            async for chunk in body_chunks(request, timeout):
                if written + len(pending) + len(chunk) > length:
                    raise UploadInvalid(f"this part is {length} bytes; the body is longer")
                pending += chunk
                if len(pending) >= WRITE_BYTES:
                    await to_thread.run_sync(os.pwrite, fd, bytes(pending), offset + written)
                    written, pending = written + len(pending), bytearray()
            if pending:
                await to_thread.run_sync(os.pwrite, fd, bytes(pending), offset + written)
                written += len(pending)
    finally:
        os.close(fd)
    if written != length:
        raise UploadInvalid(f"this part is {length} bytes; the body had {written}")
