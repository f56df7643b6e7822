"""Webhook endpoints and deliveries as the API sees them: register (the URL checked, the
secret shown once), list, delete, the tenant's job-webhook secret, and the deliveries with
every attempt. Deliveries themselves change only through app/webhooks/outbox.py."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import JobNotFound, WebhookInvalid, WebhookNotFound
from app.models import Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.schemas.webhooks import DeliveryAttemptPublic, DeliveryPublic, WebhookCreate
from app.webhooks import outbox, targets
from app.webhooks.outbox import new_secret


def create_endpoint(
    session: Session, *, tenant_id: str, body: WebhookCreate, settings: Settings
) -> WebhookEndpoint:
    """A new endpoint for every job of the tenant; 422 for a URL that may not receive
    webhooks (not https, or resolving to a private, loopback or link-local address)."""
    try:
        targets.check(
            body.url,
            allow_http=settings.WEBHOOK_ALLOW_HTTP,
            allow_private=settings.WEBHOOK_ALLOW_PRIVATE,
        )
    except targets.UnsafeTarget as e:
        raise WebhookInvalid(f"url: {e}") from None
    count = session.scalar(select(func.count()).where(WebhookEndpoint.tenant_id == tenant_id))
    if (count or 0) >= settings.MAX_WEBHOOKS_PER_TENANT:
        raise WebhookInvalid(
            f"a tenant has at most {settings.MAX_WEBHOOKS_PER_TENANT} endpoints; delete one first"
        )
    endpoint = WebhookEndpoint(
        tenant_id=tenant_id,
        url=body.url,
        events=list(dict.fromkeys(body.events)),
        secret=new_secret(),
        description=body.description,
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def list_endpoints(session: Session, *, tenant_id: str) -> list[WebhookEndpoint]:
    return list(
        session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.tenant_id == tenant_id)
            .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
        )
    )


def get_endpoint(session: Session, *, tenant_id: str, webhook_id: str) -> WebhookEndpoint:
    row = session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == webhook_id, WebhookEndpoint.tenant_id == tenant_id
        )
    )
    if row is None:
        raise WebhookNotFound(f"no webhook {webhook_id!r}")
    return row


def delete_endpoint(session: Session, *, tenant_id: str, webhook_id: str) -> None:
    """Delete an endpoint and its deliveries (pending ones are never sent)."""
    get_endpoint(session, tenant_id=tenant_id, webhook_id=webhook_id)
    session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == webhook_id))


def default_secret(session: Session, *, tenant_id: str) -> str:
    return outbox.tenant_secret(session, tenant_id=tenant_id)


def list_deliveries(
    session: Session,
    *,
    tenant_id: str,
    webhook_id: str | None = None,
    job_id: str | None = None,
    limit: int,
    after: str | None,
) -> tuple[list[DeliveryPublic], bool]:
    """Deliveries to an endpoint, or about a job, newest first, each with its attempts."""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id)
    if webhook_id is not None:
        get_endpoint(session, tenant_id=tenant_id, webhook_id=webhook_id)
        query = query.where(WebhookDelivery.endpoint_id == webhook_id)
    if job_id is not None:
        if (
            session.scalar(select(Job.id).where(Job.id == job_id, Job.tenant_id == tenant_id))
            is None
        ):
            raise JobNotFound(f"no job {job_id!r}")
        query = query.where(WebhookDelivery.job_id == job_id)
    if after is not None:
        cursor = session.scalar(select(WebhookDelivery.seq).where(WebhookDelivery.id == after))
        if cursor is None:
            raise WebhookNotFound(f"no delivery {after!r} to page after")
        query = query.where(WebhookDelivery.seq < cursor)
    rows = list(session.scalars(query.order_by(WebhookDelivery.seq.desc()).limit(limit + 1)))
    rows, has_more = rows[:limit], len(rows) > limit
    attempts: dict[str, list[WebhookAttempt]] = {d.id: [] for d in rows}
    if rows:
        for a in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(attempts)))
            .order_by(WebhookAttempt.attempt)
        ):
            attempts[a.delivery_id].append(a)
    return [_public(d, attempts[d.id]) for d in rows], has_more


def _public(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryPublic:
    return DeliveryPublic(
        id=d.id,
        webhook_id=d.endpoint_id,
        job_id=d.job_id,
        event=d.event,
        url=d.url,
        status=d.status,  # type: ignore[arg-type]
        attempts=[DeliveryAttemptPublic.model_validate(a) for a in attempts],
        next_attempt_at=d.next_attempt_at,
        created_at=d.created_at,
    )
