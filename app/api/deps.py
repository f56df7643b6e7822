"""Named dependencies: the request's DB session, the caller's tenant, settings, storage."""

from __future__ import annotations

import functools
import hmac
import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.admission import Admission, Kind, Slot
from app.core.config import Settings
from app.core.db import Database
from app.core.errors import (
    MetricsDisabled,
    Overloaded,
    QuotaExceeded,
    Unauthorized,
    error_responses,
)
from app.core.storage import Storage
from app.models import Tenant
from app.services import tenants


async def get_db(request: Request) -> AsyncIterator[Session]:
    """The request's session. It takes no connection until the route's first query, which
    runs on the route's thread; that thread also commits it (`UnitOfWorkRoute`), so the
    connection is back in the pool before the request waits for anything else (a thread, the
    body, the client). Services only flush."""
    session = request.app.state.db.sessionmaker()
    failed = False
    try:
        yield session
    except BaseException:
        failed = True
        raise
    finally:
        if session.in_transaction():  # an async route that used it: end it off the loop
            await run_in_threadpool(_end, session, failed)
        else:
            session.close()  # nothing checked out: no I/O


def _end(session: Session, failed: bool) -> None:
    try:
        if failed:
            session.rollback()
        else:
            session.commit()
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db, scope="function")]


def _unit_of_work(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)
    def run(*args: Any, **kwargs: Any) -> Any:
        sessions = [v for v in kwargs.values() if isinstance(v, Session)]
        try:
            result = endpoint(*args, **kwargs)
        except BaseException:
            for session in sessions:
                session.rollback()
            raise
        for session in sessions:
            session.commit()  # on this thread, before the response is built and sent
        return result

    return run


class UnitOfWorkRoute(APIRoute):
    """A sync route's session is committed (or rolled back) on the route's own thread.

    FastAPI runs a sync route and each sync dependency on a thread of their own, one after
    the other, and the request waits for a free thread between them. A session that took a
    connection on one thread and gave it back on a later one held it through those waits:
    with more waiting requests than pooled connections, threads waited for connections held
    by requests waiting for threads, until the pool's timeout turned them into 500s (FastAPI
    issue 3205)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _unit_of_work(endpoint)
        super().__init__(path, endpoint, **kwargs)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer dk_…`")


def _bearer_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized(
            "missing API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return credentials.credentials


def _authenticate(db: Database, key: str) -> Tenant | None:
    with db.session() as session:  # on a thread, the connection held only here
        return tenants.authenticate(session, key=key)


@asynccontextmanager
async def _admitted(request: Request, key: str, kind: Kind) -> AsyncIterator[Tenant]:
    """The key's tenant, within its quota of `kind`: 429 above it, before a thread is taken."""
    admission: Admission = request.app.state.admission
    async with admission.slot(kind, key) as slot:
        tenant = await run_in_threadpool(_authenticate, request.app.state.db, key)
        if tenant is None:
            raise Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        slot.owner_is(tenant.id)
        yield tenant


async def current_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AsyncIterator[Tenant]:
    async with _admitted(request, _bearer_key(credentials), "requests") as tenant:
        yield tenant


@dataclass
class StreamAdmission:
    """An event stream's caller: its key (checked with the stream's first page, in one trip to
    the database) and its slot of TENANT_MAX_STREAMS, held until the stream ends."""

    key: str
    slot: Slot


async def stream_admission(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> AsyncIterator[StreamAdmission]:
    key = _bearer_key(credentials)
    async with request.app.state.admission.slot("streams", key) as slot:
        yield StreamAdmission(key, slot)


TenantDep = Annotated[Tenant, Depends(current_tenant)]
# What any authenticated route may answer under load (its router lists them in OpenAPI).
LOADED = error_responses(QuotaExceeded, Overloaded)
StreamDep = Annotated[StreamAdmission, Depends(stream_admission)]


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
