"""Named dependencies: the request's DB session, the caller's tenant, settings, storage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Unauthorized
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


def get_enqueue(request: Request):
    return request.app.state.enqueue
