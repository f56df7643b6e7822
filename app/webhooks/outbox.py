"""Every change of a webhook delivery's state, in one place (as app/jobs/lifecycle.py is for
jobs): recorded in the same transaction as the job's change that caused it, sent after that
commits, claimed by one attempt at a time, retried with backoff for a day, given up after.

The DB row is the source of truth, never the broker: a delivery whose task was lost (a broker
restart, a worker killed while it held a delayed retry) is sent again by the reaper."""

from __future__ import annotations

import base64
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.db import after_commit
from app.models import Job, Tenant, WebhookAttempt, WebhookDelivery, WebhookEndpoint, new_id, utcnow
from distillery_contract.webhooks import DeliveryStatus, WebhookEvent

log = logging.getLogger("distillery.webhooks")

# Session.info key: `send(delivery_id, countdown)` sends a delivery's task (Database(info=…)).
SEND_WEBHOOK = "send_webhook"
SendWebhook = Callable[[str, float], None]
RESPONSE_PREFIX = 256  # bytes of a receiver's answer kept with an attempt


def _targets(session: Session, job: Job, event: WebhookEvent) -> list[tuple[str | None, str]]:
    """(endpoint id, url) of every receiver of `event` for this job: the tenant's endpoints,
    and the webhook the job's spec names (endpoint id None)."""
    endpoints = session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == job.tenant_id)
    ).all()
    out: list[tuple[str | None, str]] = [(e.id, e.url) for e in endpoints if event in e.events]
    own = (job.spec or {}).get("webhook")
    if isinstance(own, dict) and event in (own.get("events") or ()):
        out.append((None, own["url"]))
    return out


def record(
    session: Session, *, job: Job, event: WebhookEvent, detail: dict[str, Any] | None = None
) -> list[str]:
    """Record a delivery of `event` for each receiver, due now, and send their tasks once this
    transaction commits (never before: the task must find its row). Returns their ids."""
    now, ids = utcnow(), []
    for endpoint_id, url in _targets(session, job, event):
        delivery = WebhookDelivery(
            id=new_id("msg"),
            tenant_id=job.tenant_id,
            endpoint_id=endpoint_id,
            job_id=job.id,
            event=event,
            detail=detail or {},
            url=url,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        session.add(delivery)
        ids.append(delivery.id)
    send = session.info.get(SEND_WEBHOOK)
    if ids and send is not None:
        after_commit(session, lambda: send_all(send, ids))
    return ids


def send_all(send: SendWebhook, ids: list[str]) -> int:
    """Send each delivery's task; one the broker refuses is left to the reaper."""
    sent = 0
    for delivery_id in ids:
        try:
            send(delivery_id, 0.0)
            sent += 1
        except Exception:
            log.warning("could not send webhook %s; the reaper will", delivery_id, exc_info=True)
    return sent


@dataclass(frozen=True)
class Claimed:
    """What one attempt needs, read under the claim."""

    id: str
    url: str
    secret: str
    attempt: int  # 1-based number of this attempt
    payload: dict[str, Any] | None  # None until the first attempt freezes it
    job_id: str
    tenant_id: str
    event: str
    detail: dict[str, Any]


def claim(session: Session, *, delivery_id: str, lease_seconds: float) -> Claimed | None:
    """Take a pending delivery that is due, pushing its next attempt `lease_seconds` ahead so
    that a duplicate task (the reaper's resend, a redelivered message) finds it not due. None
    when it is not pending, not due yet, or gone (its job was deleted)."""
    now = utcnow()
    taken = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= now + timedelta(seconds=1),
        )
        .values(next_attempt_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    ).rowcount
    if not taken:
        return None
    d = session.scalars(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)).one()
    return Claimed(
        d.id,
        d.url,
        _secret(session, d),
        d.attempts + 1,
        d.payload,
        d.job_id,
        d.tenant_id,
        d.event,
        d.detail or {},
    )


def _secret(session: Session, d: WebhookDelivery) -> str:
    if d.endpoint_id is not None:
        return session.scalars(
            select(WebhookEndpoint.secret).where(WebhookEndpoint.id == d.endpoint_id)
        ).one()
    return tenant_secret(session, tenant_id=d.tenant_id)


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def tenant_secret(session: Session, *, tenant_id: str) -> str:
    """The secret that signs the webhooks a tenant's jobs name; made on first use."""
    # Set only where none is: of two first uses at once, one secret wins and both read it.
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant_id, Tenant.webhook_secret.is_(None))
        .values(webhook_secret=new_secret())
        .execution_options(synchronize_session=False)
    )
    return session.scalars(select(Tenant.webhook_secret).where(Tenant.id == tenant_id)).one()


def freeze_payload(session: Session, *, delivery_id: str, payload: dict[str, Any]) -> None:
    """The body every attempt sends, from the first attempt on (at-least-once, same body)."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.payload.is_(None))
        .values(payload=payload)
        .execution_options(synchronize_session=False)
    )


def backoff(
    attempt: int, *, base: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """Seconds before attempt `attempt + 1`: base * 4^(attempt-1), capped, +-25 % jitter so
    that deliveries failing together do not retry together."""
    delay = min(cap, base * 4 ** (attempt - 1))
    return delay * (0.75 + 0.5 * rng())


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    response: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def record_attempt(
    session: Session,
    *,
    claimed: Claimed,
    outcome: Outcome,
    retry_for: float,
    base: float,
    cap: float,
) -> float | None:
    """Store the attempt and settle the delivery: succeeded on a 2xx; else due again after the
    backoff while within `retry_for` of the event, failed after. Returns the seconds until the
    next attempt (its task is sent after commit), or None when the delivery is settled."""
    now = utcnow()
    d = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == claimed.id))
    if d is None:  # deleted meanwhile, with its endpoint or its job
        return None
    session.add(
        WebhookAttempt(
            delivery_id=claimed.id,
            attempt=claimed.attempt,
            at=now,
            status_code=outcome.status_code,
            error=outcome.error,
            response=outcome.response[:RESPONSE_PREFIX],
            seconds=outcome.seconds,
        )
    )
    d.attempts = claimed.attempt
    if outcome.ok:
        d.status, d.next_attempt_at = DeliveryStatus.SUCCEEDED, None
        return None
    delay = backoff(claimed.attempt, base=base, cap=cap)
    if now + timedelta(seconds=delay) > d.created_at + timedelta(seconds=retry_for):
        d.status, d.next_attempt_at = DeliveryStatus.FAILED, None
        return None
    d.next_attempt_at = now + timedelta(seconds=delay)
    send = session.info.get(SEND_WEBHOOK)
    if send is not None:
        after_commit(session, lambda: send(claimed.id, delay))
    return delay


def resend_lost(session: Session, *, older_than: datetime, limit: int = 100) -> list[str]:
    """Pending deliveries due before `older_than` (their task was lost): made due now and sent
    again after commit. Safe in many processes at once: rows are locked and skipped."""
    rows = session.scalars(
        select(WebhookDelivery)
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at < older_than,
        )
        .with_for_update(skip_locked=True)
        .limit(limit)
    ).all()
    now = utcnow()
    for d in rows:
        d.next_attempt_at = now
    ids = [d.id for d in rows]
    send = session.info.get(SEND_WEBHOOK)
    if ids and send is not None:
        after_commit(session, lambda: send_all(send, ids))
    return ids
