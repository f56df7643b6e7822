"""Named dependencies: the request's DB session, the caller's tenant, settings, storage."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import MetricsDisabled, Unauthorized
from app.core.storage import Storage
from app.models import Tenant
from app.services import tenants


def get_db(request: Request) -> Iterator[Session]:
    """One session per request: committed once when the route returns, before the response is
    sent (scope="function"), rolled back on error. Services only flush."""
    with request.app.state.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db, scope="function")]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer dk_…`")


def current_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized(
            "missing API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tenant = tenants.authenticate(session, key=credentials.credentials)
    if tenant is None:
        raise Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


_metrics_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="MetricsToken",
    description="the operator's METRICS_TOKEN: `Authorization: Bearer <token>` (not an API key)",
)


def metrics_scraper(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_metrics_bearer)],
) -> None:
    """Let through the operator's scraper only: the job counts span every tenant, so neither
    an anonymous caller nor a tenant's API key may read them."""
    token = settings.METRICS_TOKEN
    if not token:
        raise MetricsDisabled(
            "/metrics is off: it counts every tenant's jobs. Set METRICS_TOKEN on the API and "
            "scrape with Authorization: Bearer <METRICS_TOKEN>"
        )
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized(
            "missing or wrong metrics token: send Authorization: Bearer <METRICS_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


def get_enqueue(request: Request):
    return request.app.state.enqueue
