"""One attempt of a delivery: the body signed per Standard Webhooks (webhook-id,
webhook-timestamp, webhook-signature: HMAC-SHA256 with the `standardwebhooks` library, so
receivers verify with any of the spec's libraries), POSTed to the address the URL's check
resolved (no redirects followed, short timeouts, only the start of the answer read)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from app.webhooks.outbox import RESPONSE_PREFIX, Outcome
from app.webhooks.targets import UnsafeTarget, check

USER_AGENT = "Distillery-Webhooks/1"


def body_of(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), default=str)


def signed_headers(
    secret: str, msg_id: str, body: str, now: datetime | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers. Each attempt is signed at its own time (receivers
    refuse timestamps older than a few minutes); the id stays the delivery's."""
    from standardwebhooks.webhooks import Webhook

    when = now or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def post(
    url: str,
    body: str,
    headers: dict[str, str],
    *,
    timeout: float,
    allow_http: bool,
    allow_private: bool,
) -> Outcome:
    """One POST. The URL is checked again here (its DNS may have changed since it was
    registered) and the request goes to the address that was checked, with the URL's host in
    the Host header and TLS SNI; environment proxies are ignored (they would choose the
    address). A redirect is an answer like any other non-2xx: never followed."""
    started = time.monotonic()
    try:
        target = check(url, allow_http=allow_http, allow_private=allow_private)
    except UnsafeTarget as e:
        return Outcome(None, f"refused: {e}", "", time.monotonic() - started)
    request_headers = {**headers, "host": target.url.netloc.decode()}
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
            client.stream(
                "POST",
                target.url.copy_with(host=target.addresses[0]),
                content=body.encode(),
                headers=request_headers,
                extensions={"sni_hostname": target.url.host},
            ) as response,
        ):
            prefix = _read_prefix(response)
            return Outcome(response.status_code, None, prefix, time.monotonic() - started)
    except httpx.TimeoutException:
        return Outcome(None, f"timeout after {timeout:g}s", "", time.monotonic() - started)
    except httpx.HTTPError as e:
        return Outcome(None, f"{type(e).__name__}: {e}"[:500], "", time.monotonic() - started)


def _read_prefix(response: httpx.Response) -> str:
    """The first RESPONSE_PREFIX bytes of the answer; the rest is never read."""
    got = b""
    for chunk in response.iter_bytes():
        got += chunk
        if len(got) >= RESPONSE_PREFIX:
            break
    return got[:RESPONSE_PREFIX].decode("utf-8", errors="replace")
