"""The FastAPI application factory."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import dashboard
from app.api.admission import Admission, Kind
from app.api.events import EventFeed
from app.api.metrics import Metrics, MetricsMiddleware
from app.api.routes import health, jobs, resumable, uploads, webhooks
from app.core.body_limit import BodyLimitMiddleware, LimitFor
from app.core.config import Settings
from app.core.db import Database, PoolSize
from app.core.errors import AppError, Overloaded, StorageUnavailable
from app.core.headers import SecurityHeadersMiddleware
from app.core.storage import Storage, StorageError, open_storage
from app.jobs.lifecycle import Enqueue
from app.jobs.reaper import Reaper
from app.services.resumable import ExpireUploads
from app.services.retention import Retention
from distillery_contract.errors import ErrorCode
from worker.pipeline.spec import field_path

log = logging.getLogger("distillery.api")


def _error(
    status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _loc(loc: tuple) -> str:
    parts = tuple(p for p in loc if p != "body")
    return field_path(parts) if parts else "body"


def _is_submit(request: Request) -> bool:
    return request.url.path == "/v1/jobs" and request.method == "POST"


def _invalid_code(request: Request) -> ErrorCode:
    return ErrorCode.INVALID_SPEC if _is_submit(request) else ErrorCode.INVALID_REQUEST


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(422, _invalid_code(request), message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and _is_submit(request):
            # FastAPI answers a body json.loads cannot take (not UTF-8, nested too deep) with a
            # bare 400; to the client it is a malformed spec like any other.
            return _error(
                422, ErrorCode.INVALID_SPEC, f"body: not a readable JSON document ({exc.detail})"
            )
        codes = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}
        code = codes.get(exc.status_code, ErrorCode.HTTP_ERROR)
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(DataError)
    async def unstorable(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value of the request (a NUL character in PostgreSQL text, a
        # number out of range): that is the request's fault, and retrying will not help.
        log.info("database refused a request value: %s", exc.orig)
        return _error(
            422,
            _invalid_code(request),
            "a value in the request cannot be stored or looked up (NUL characters and numbers "
            "out of range are refused)",
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def db_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database error: %s", exc)
        return _error(
            503,
            ErrorCode.DATABASE_UNAVAILABLE,
            "the database is unavailable; retry shortly",
            {"Retry-After": "5"},
        )

    @app.exception_handler(PoolTimeout)
    async def overloaded(_: Request, exc: Exception) -> JSONResponse:
        # Every pooled connection stayed busy for DB_POOL_TIMEOUT_SECONDS: the database is
        # slower than the traffic. Say so at once; the client retries later.
        log.warning("no database connection in time: %s", exc)
        err = Overloaded("the service is overloaded; retry shortly", headers={"Retry-After": "2"})
        return _error(err.status_code, err.code, err.message, err.headers)

    @app.exception_handler(StorageError)
    async def store_down(_: Request, exc: StorageError) -> JSONResponse:
        # Nothing was written: an upload's row rolled back with its file, a download gave
        # nothing. The message says what failed, never the bucket or a path.
        log.warning("store error: %s", exc)
        err = StorageUnavailable(f"{exc}; retry shortly", headers={"Retry-After": "5"})
        return _error(err.status_code, err.code, err.message, err.headers)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(
            500, ErrorCode.INTERNAL_ERROR, "internal error; the server log has the details"
        )


def _lifespan(
    settings: Settings, db: Database, storage: Storage, reaper: Reaper | None, feed: EventFeed
):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from app.core.migrate import upgrade
        from app.services import tenants
        from worker.pipeline.archs import check_arch
        from worker.pipeline.spec import warm_registries

        settings.home.mkdir(parents=True, exist_ok=True)
        storage.ensure()
        # Spec checks build models on PyTorch's meta device; loading torchvision takes seconds
        # the first time, so pay it at start rather than in the first POST (measured: 2-3 s).
        check_arch("resnet18", {}, (3, 32, 32), 10)
        # The spec's validators look names up in the pipeline's registries, importing their
        # modules (ONNX, scikit-learn) on first use. FastAPI validates a request body on the
        # event loop, so the first POST /v1/jobs froze every stream and /healthz for seconds
        # on a loaded host; import them here instead (the first POST loaded them anyway).
        warm_registries()
        # torch leaves ~250k long-lived objects; without freezing them every full collection
        # stalled all requests for ~170 ms (measured under wrk: list p99 239 -> 141 ms).
        gc.collect()
        gc.freeze()
        upgrade(settings.database_url)
        if settings.DISTILLERY_API_KEY:
            with db.session() as s:
                tenants.create_key(s, tenant_name="default", key=settings.DISTILLERY_API_KEY)
        # Sync routes and dependencies run on these threads; the pool has a connection for each.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.API_THREADS
        if reaper is not None:
            reaper.start()
        await feed.start()
        yield
        await feed.stop()
        if reaper is not None:
            reaper.stop()
        if getattr(app.state, "probe", None) is not None:
            app.state.probe.close()
        db.dispose()

    return lifespan


def create_app(
    settings: Settings | None = None, *, enqueue: Enqueue | None = None, start_reaper: bool = True
) -> FastAPI:
    """Build the API. `enqueue` defaults to sending a Celery message on the configured broker."""
    from app.webhooks.outbox import SEND_WEBHOOK
    from worker.celery_app import make_celery, make_enqueue, make_queue_size, make_send_webhook

    settings = settings or Settings()
    celery = make_celery(settings)
    send = enqueue or make_enqueue(celery)
    # Job changes the API makes (a cancel) record webhook deliveries; their tasks go out after
    # the commit through this.
    pool = PoolSize.for_threads(settings.API_THREADS, timeout=settings.DB_POOL_TIMEOUT_SECONDS)
    db = Database(settings.database_url, info={SEND_WEBHOOK: make_send_webhook(celery)}, pool=pool)
    storage = open_storage(settings)
    chores = [Retention(db, settings, storage), ExpireUploads(db, storage)]
    reaper = (
        Reaper(db, settings, send, make_queue_size(celery), chores=chores) if start_reaper else None
    )
    feed = EventFeed(db, settings)
    app = FastAPIOffline(
        title="Distillery",
        version="1.0.0",
        summary="Knowledge distillation, pruning and quantization as a service.",
        description="Submit a job spec; poll or stream its progress; download the compressed model. "
        'Every metric is measured on ONNX Runtime (CPU). Errors are `{"error": {"code", "message"}}`.',
        lifespan=_lifespan(settings, db, storage, reaper, feed),
    )
    app.state.settings, app.state.db, app.state.storage = settings, db, storage
    app.state.celery, app.state.enqueue = celery, send
    app.state.metrics = Metrics(db)
    app.state.feed = feed
    app.state.admission = Admission(_quota(settings))
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(uploads.router)
    app.include_router(resumable.router)
    app.include_router(webhooks.router)
    dashboard.mount(app)
    app.add_middleware(BodyLimitMiddleware, limit_for=_body_limit(settings))
    app.add_middleware(SecurityHeadersMiddleware)
    # Outermost: counts the 413s too.
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


def _quota(settings: Settings):
    def limit_of(kind: Kind) -> int:
        return settings.TENANT_MAX_STREAMS if kind == "streams" else settings.TENANT_MAX_REQUESTS

    return limit_of


UPLOAD_ROUTES = frozenset({("POST", "/v1/datasets"), ("POST", "/v1/models")})


def _body_limit(settings: Settings) -> LimitFor:
    def limit_for(scope) -> int | None:
        method, path = scope["method"], scope["path"]
        if (method, path) in UPLOAD_ROUTES or (method == "PUT" and path.startswith("/v1/uploads/")):
            return None  # the route streams to disk under its own cap, MAX_UPLOAD_BYTES
        return settings.MAX_REQUEST_BYTES  # read per request: a test may change it live

    return limit_for
