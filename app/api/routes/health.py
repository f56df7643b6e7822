from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from app.api.deps import metrics_scraper
from app.core.db import Database, PoolSize
from app.core.errors import MetricsDisabled, Unauthorized, error_responses
from app.jobs import workers

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (no dependencies checked). Answered on the event loop: it never
    waits behind user requests for a thread or a database connection."""
    return Health(status="ok")


class Probe:
    """Readiness's own budget: two threads and a database pool of its own (at most two
    connections, a 2 s wait), so /readyz answers while user traffic fills the API's."""

    def __init__(self, url: str) -> None:
        self.db = Database(url, pool=PoolSize(size=1, overflow=1, timeout=2.0))
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="readyz")

    async def run(self, check, request: Request) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, check, request)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.db.dispose()


def _probe(request: Request) -> Probe:
    probe = getattr(request.app.state, "probe", None)
    if probe is None:
        probe = request.app.state.probe = Probe(request.app.state.db.url)
    return probe


def _check_db(request: Request) -> str:
    with _probe(request).db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return "ok"


def _check_broker(request: Request) -> str:
    with request.app.state.celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
    return "ok"


def _check_workers(request: Request) -> str:
    settings = request.app.state.settings
    queue = settings.DEFAULT_QUEUE
    with _probe(request).db.session() as s:
        live = workers.live_workers(
            s, queue=queue, heartbeat_timeout=settings.HEARTBEAT_TIMEOUT_SECONDS
        )
    if not live:
        # Jobs would be accepted and then wait forever: not ready, and say why.
        raise NotReady(f"no live worker consumes queue {queue!r}; start one (distillery worker)")
    return "ok"


class NotReady(Exception):
    pass


def _check_storage(request: Request) -> str:
    if not request.app.state.storage.writable():
        raise OSError("the storage folder is not writable")  # its path is the operator's
    return "ok"


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "a dependency is down"}},
)
async def readyz(request: Request) -> Response:
    """Ready when the database, the broker and the artifact storage all answer, and a live
    worker (heartbeat within HEARTBEAT_TIMEOUT_SECONDS) consumes the default queue."""
    checks: dict[str, str] = {}
    probe = _probe(request)
    for name, check in (
        ("database", _check_db),
        ("broker", _check_broker),
        ("storage", _check_storage),
        ("workers", _check_workers),
    ):
        try:
            checks[name] = await probe.run(check, request)
        except NotReady as e:
            checks[name] = f"error: {e}"
        except Exception as e:
            checks[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
    ok = all(v == "ok" for v in checks.values())
    body = Readiness(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(
        body.model_dump(),
        status_code=200 if ok else 503,
        headers={} if ok else {"Retry-After": "5"},
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}},
        **error_responses(Unauthorized, MetricsDisabled),
    },
    dependencies=[Depends(metrics_scraper)],
)
def prometheus(request: Request) -> Response:
    """Prometheus text format: requests, jobs by status, stage durations. The job counts span
    every tenant: it needs `Authorization: Bearer <METRICS_TOKEN>`, and answers 404
    `metrics_disabled` while the API runs without METRICS_TOKEN."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
