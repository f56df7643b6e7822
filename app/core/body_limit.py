"""A cap on request bodies, enforced before the application sees one.

Without it a 15 MB job spec was parsed whole and took the API to 13 GB, and a request
declaring `Content-Length: 1000000000` held a connection while the server waited for the
body. A body over the cap is answered `413 payload_too_large` without calling the app: at
once from a declared Content-Length (not a byte of the body read), or as soon as a chunked
or streamed body has delivered one byte too many. A body within the cap is buffered (at
most the cap) and handed to the app as it came.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import PayloadTooLarge

# The cap for one request, or None for routes that enforce their own while streaming
# (uploads: app/api/upload.py, MAX_UPLOAD_BYTES): those get `close_if_unread`.
LimitFor = Callable[[Scope], int | None]


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimitMiddleware:
    """413 for a body over `limit_for(scope)` bytes; a request whose limit is None passes
    through untouched."""

    def __init__(self, app: ASGIApp, limit_for: LimitFor) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        if limit is None:
            await close_if_unread(self.app, scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, receive, send, f"of {declared} bytes is", limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(scope, receive, send, "is", limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


async def close_if_unread(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run `app`; an answer sent before the whole body was read (a 401, 413, 507, 408 on an
    upload) says `Connection: close`, so the server closes the connection instead of reading
    and discarding the rest: a refused 1 GB upload used to be answered in 4 ms and then read
    in full."""
    done = _declared_length(scope) == 0

    async def tracked() -> Message:
        nonlocal done
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            done = True
        return message

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start" and not done:
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    await app(scope, tracked, closing)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message, then the connection's own messages (a disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def _refuse(scope: Scope, receive: Receive, send: Send, what: str, limit: int) -> None:
    error = PayloadTooLarge(
        f"request body {what} over the {limit} byte limit "
        "(files go to POST /v1/datasets and POST /v1/models)"
    )
    # Connection: close, as the rest of the body will not be read: the connection cannot
    # carry another request.
    response = JSONResponse(
        error.body(), status_code=error.status_code, headers={"connection": "close"}
    )
    await response(scope, receive, send)
