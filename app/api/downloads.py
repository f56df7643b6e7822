"""An artifact's bytes from a bucket: a redirect to a presigned URL, or streamed through the
API with `Range` and `If-Range` honoured as FileResponse honours them for a local folder."""

from __future__ import annotations

import re

from fastapi import Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.core.config import Settings
from app.core.storage import Storage
from app.models import Artifact

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")

# Content-Type by the artifact's suffix: the files a job writes, named here rather than
# guessed by `mimetypes`, whose answers depend on the host's /etc/mime.types.
MEDIA_TYPES = {
    ".png": "image/png",
    ".json": "application/json",
    ".csv": "text/csv; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
}
BINARY = "application/octet-stream"  # models: .onnx, .pt, .safetensors


def media_type(name: str) -> str:
    """The Content-Type an artifact named `name` is served with."""
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    return MEDIA_TYPES.get(suffix, BINARY)


def _span(range_header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range asked for, as (first, last); None for the whole file (no Range, or
    one this does not serve as a range, such as several ranges: RFC 9110 lets it send all)."""
    match = _RANGE.match((range_header or "").strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        return max(size - int(last), 0), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def from_store(
    storage: Storage,
    settings: Settings,
    artifact: Artifact,
    *,
    redirect: bool,
    range_header: str | None,
    if_range: str | None,
    media_type: str,
) -> Response:
    etag = f'"{artifact.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    if redirect and settings.DOWNLOAD_MODE == "redirect":
        url = storage.presigned_url(
            artifact.path,
            filename=artifact.name,
            expires=settings.PRESIGN_EXPIRY_SECONDS,
            content_type=media_type,
        )
        if url is not None:
            return RedirectResponse(url, status_code=307, headers=headers)
    size = artifact.bytes
    span = _span(range_header, size) if if_range in (None, etag) else None
    headers["Content-Disposition"] = f'attachment; filename="{artifact.name}"'
    if span is not None and span[0] >= size:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    first, last = span or (0, size - 1)
    body = storage.stream(artifact.path, first, last) if size else iter(())
    headers["Content-Length"] = str(last - first + 1 if size else 0)
    if span is None:
        return StreamingResponse(body, media_type=media_type, headers=headers)
    headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(body, status_code=206, media_type=media_type, headers=headers)
