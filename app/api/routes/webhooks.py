"""Webhook endpoints (POST, GET, DELETE /v1/webhooks), the secret of the webhooks jobs name,
and the deliveries with every attempt."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import LOADED, SessionDep, SettingsDep, TenantDep, UnitOfWorkRoute
from app.core.errors import (
    JobNotFound,
    Unauthorized,
    WebhookInvalid,
    WebhookNotFound,
    error_responses,
)
from app.schemas.webhooks import (
    DeliveriesPublic,
    WebhookCreate,
    WebhookCreated,
    WebhookPublic,
    WebhookSecretPublic,
    WebhooksPublic,
)
from app.services import webhooks as webhooks_service

router = APIRouter(tags=["webhooks"], route_class=UnitOfWorkRoute, responses=LOADED)
Limit = Annotated[int, Query(ge=1, le=200)]
After = Annotated[
    str | None, Query(max_length=64, description="id of the last delivery of the previous page")
]


def _page(data: list, has_more: bool) -> DeliveriesPublic:
    return DeliveriesPublic(
        data=data, has_more=has_more, next_after=data[-1].id if has_more and data else None
    )


@router.post(
    "/v1/webhooks",
    status_code=201,
    response_model=WebhookCreated,
    responses=error_responses(Unauthorized, WebhookInvalid),
)
def create_webhook(
    body: WebhookCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep
) -> WebhookCreated:
    """Register an endpoint told about every job of the tenant (`events`: job.succeeded,
    job.failed, job.cancelled, job.stage). The URL must be https on a public address (checked
    after DNS; 422 `invalid_webhook` otherwise). The answer holds the signing `secret`, shown
    only here. Deliveries follow Standard Webhooks: `webhook-id`, `webhook-timestamp`,
    `webhook-signature` (HMAC-SHA256), body `{type, timestamp, data: the job}`."""
    row = webhooks_service.create_endpoint(
        session, tenant_id=tenant.id, body=body, settings=settings
    )
    return WebhookCreated.model_validate(row)


@router.get("/v1/webhooks", response_model=WebhooksPublic, responses=error_responses(Unauthorized))
def list_webhooks(session: SessionDep, tenant: TenantDep) -> WebhooksPublic:
    """The tenant's endpoints, oldest first (their secrets are never shown again)."""
    rows = webhooks_service.list_endpoints(session, tenant_id=tenant.id)
    return WebhooksPublic(data=[WebhookPublic.model_validate(r) for r in rows])


@router.get(
    "/v1/webhooks/default/secret",
    response_model=WebhookSecretPublic,
    responses=error_responses(Unauthorized),
)
def webhook_secret(session: SessionDep, tenant: TenantDep) -> WebhookSecretPublic:
    """The secret that signs the deliveries of the webhooks jobs name in their spec
    (`"webhook": {"url", "events"}`): one per tenant, made on first use."""
    return WebhookSecretPublic(secret=webhooks_service.default_secret(session, tenant_id=tenant.id))


@router.delete(
    "/v1/webhooks/{webhook_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(Unauthorized, WebhookNotFound),
)
def delete_webhook(webhook_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    """Delete an endpoint; its pending deliveries are not sent."""
    webhooks_service.delete_endpoint(session, tenant_id=tenant.id, webhook_id=webhook_id)
    return Response(status_code=204)


@router.get(
    "/v1/webhooks/{webhook_id}/deliveries",
    response_model=DeliveriesPublic,
    responses=error_responses(Unauthorized, WebhookNotFound),
)
def webhook_deliveries(
    webhook_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 20,
    after: After = None,
) -> DeliveriesPublic:
    """Deliveries to the endpoint, newest first, each with every attempt (status code, or
    why there was none, and the start of the answer)."""
    data, has_more = webhooks_service.list_deliveries(
        session, tenant_id=tenant.id, webhook_id=webhook_id, limit=limit, after=after
    )
    return _page(data, has_more)


@router.get(
    "/v1/jobs/{job_id}/webhook-deliveries",
    response_model=DeliveriesPublic,
    responses=error_responses(Unauthorized, JobNotFound),
    tags=["jobs"],
)
def job_webhook_deliveries(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 20,
    after: After = None,
) -> DeliveriesPublic:
    """Every delivery about the job (to the tenant's endpoints and to the job's own webhook),
    newest first, with every attempt."""
    data, has_more = webhooks_service.list_deliveries(
        session, tenant_id=tenant.id, job_id=job_id, limit=limit, after=after
    )
    return _page(data, has_more)
