from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from app.api import downloads
from app.api.deps import (
    LOADED,
    SessionDep,
    SettingsDep,
    StorageDep,
    StreamDep,
    TenantDep,
    UnitOfWorkRoute,
    get_enqueue,
)
from app.api.events import HEARTBEAT, Ended, EventFeed
from app.core.config import Settings
from app.core.errors import (
    ArtifactNotFound,
    ArtifactsExpired,
    IdempotencyConflict,
    JobNotFound,
    JobStateConflict,
    PayloadTooLarge,
    QuotaExceeded,
    SpecInvalid,
    StorageUnavailable,
    Unauthorized,
    error_responses,
)
from app.core.storage import Storage
from app.jobs.states import JobStatus
from app.models import Artifact
from app.schemas.jobs import (
    ArtifactPublic,
    ArtifactsPublic,
    CandidatePublic,
    CandidatesPublic,
    HistoryPublic,
    HistoryRowPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
)
from app.services import jobs as jobs_service
from worker.pipeline.history import to_csv

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=UnitOfWorkRoute, responses=LOADED)
AUTH = (Unauthorized,)


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={
        200: {
            "model": JobPublic,
            "description": "replayed: the job an earlier request with the same Idempotency-Key created",
        },
        **error_responses(
            *AUTH, IdempotencyConflict, PayloadTooLarge, SpecInvalid, StorageUnavailable
        ),
    },
)
def create_job(
    spec: JobCreate,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
    response: Response,
    enqueue=Depends(get_enqueue),
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    """Validate and store a job, then enqueue it (after the commit).

    A body over `MAX_REQUEST_BYTES` (1 MiB) is refused with 413 before it is parsed; a spec
    asking for more than the `MAX_SPEC_*` limits (list lengths and nesting in `arch_kwargs`,
    layers and parameters of a model) or failing any check possible before compute (archs
    that do not fit the data, feature-loss layer names, starting weights whose tensors do not
    fit the model, read from the upload's safetensors header; a compress-only job,
    `"student": null`, that asks an ONNX or TorchScript teacher to be pruned) is refused with
    422 naming the field. 503 when the store holding the uploads cannot be read."""
    job, created = jobs_service.create_job(
        session,
        tenant_id=tenant.id,
        spec=spec,
        idempotency_key=idempotency_key,
        settings=settings,
        enqueue=enqueue,
        storage=storage,
    )
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return jobs_service.publish(session, [job])[0]


@router.get("", response_model=JobsPublic, responses=error_responses(*AUTH, JobNotFound))
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    after: Annotated[
        str | None, Query(max_length=64, description="id of the last job of the previous page")
    ] = None,
) -> JobsPublic:
    """Jobs newest first; page with `after`=`next_after`."""
    rows, has_more = jobs_service.list_jobs(
        session, tenant_id=tenant.id, status=status, limit=limit, after=after
    )
    data = jobs_service.publish(session, rows)
    return JobsPublic(
        data=data, has_more=has_more, next_after=data[-1].id if has_more and data else None
    )


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(*AUTH, JobNotFound))
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    job = jobs_service.get_job(session, tenant_id=tenant.id, job_id=job_id)
    return jobs_service.publish(session, [job])[0]


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(*AUTH, JobNotFound, JobStateConflict),
)
def delete_job(
    job_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep
) -> Response:
    """Delete a finished job: its record, events, history and artifacts (files too). 409
    while it is queued or running: cancel it first."""
    jobs_service.delete_job(session, tenant_id=tenant.id, job_id=job_id, storage=storage)
    return Response(status_code=204)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses=error_responses(*AUTH, JobNotFound, JobStateConflict),
)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    """Queued jobs end `cancelled` at once; running ones become `cancelling` and stop at the
    next batch boundary. 409 when the job already finished."""
    job = jobs_service.cancel_job(session, tenant_id=tenant.id, job_id=job_id)
    return jobs_service.publish(session, [job])[0]


def _sse(event_id: int, kind: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


MAX_EVENT_ID = 2**63 - 1  # event ids are 64-bit integers in the database


@router.get(
    "/{job_id}/events",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "server-sent events"},
        **error_responses(*AUTH, JobNotFound, QuotaExceeded),
    },
    response_class=StreamingResponse,
)
async def job_events(
    job_id: str,
    request: Request,
    caller: StreamDep,
    last_event_id: Annotated[
        int | None, Header(alias="Last-Event-ID", ge=0, le=MAX_EVENT_ID)
    ] = None,
    after: Annotated[
        int, Query(ge=0, le=MAX_EVENT_ID, description="resume after this event id")
    ] = 0,
) -> StreamingResponse:
    """Stage changes, progress, log lines, metrics and the training history (`history`: one
    event per epoch, the row /history returns) as server-sent events, from the job's first
    event (or after `Last-Event-ID`), ending once the job has ended. A comment line every
    EVENTS_HEARTBEAT_SECONDS (15 s) keeps an idle stream open. At most TENANT_MAX_STREAMS open
    at once per tenant (429 above)."""
    feed: EventFeed = request.app.state.feed
    start = max(after, last_event_id or 0)
    tenant_id, events = await feed.open(key=caller.key, job_id=job_id, after=start)
    try:
        caller.slot.owner_is(tenant_id)  # the tenant's quota, now that the key is known
    except BaseException:
        events.close()
        raise

    async def stream():
        cursor = start
        try:
            async for item in events:
                if item is HEARTBEAT:
                    yield ": keep-alive\n\n"
                elif isinstance(item, Ended):
                    yield _sse(cursor, "end", {"status": item.status})
                    return
                else:
                    cursor = item.id
                    yield _sse(item.id, item.type, item.data)
        finally:
            events.close()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(events.aclose),  # should the stream never start
    )


@router.get(
    "/{job_id}/history",
    response_model=HistoryPublic,
    responses={
        200: {
            "content": {"text/csv": {}},
            "description": "every epoch of every training run; CSV (same columns, same order) "
            "with `Accept: text/csv`",
        },
        **error_responses(*AUTH, JobNotFound),
    },
)
def job_history(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """The training curves: one row per epoch of every training run (teacher, baseline,
    distill, each prune fine-tune) with its loss parts, learning rate, validation accuracy and
    wall time, in the order they ran; recorded as they happen, so a running job has the rows
    of its finished epochs."""
    rows = [
        HistoryRowPublic.model_validate(r)
        for r in jobs_service.history_of(session, tenant_id=tenant.id, job_id=job_id)
    ]
    if accept is not None and "text/csv" in accept:
        return Response(
            to_csv(r.model_dump() for r in rows),
            media_type="text/csv",
            headers={"Content-Disposition": 'inline; filename="history.csv"', "Vary": "Accept"},
        )
    return JSONResponse(
        HistoryPublic(data=rows).model_dump(mode="json"), headers={"Vary": "Accept"}
    )


@router.get(
    "/{job_id}/candidates",
    response_model=CandidatesPublic,
    responses=error_responses(*AUTH, JobNotFound),
)
def job_candidates(job_id: str, session: SessionDep, tenant: TenantDep) -> CandidatesPublic:
    """A search job's candidates: each one's axis values, metrics with 95% intervals, gates,
    whether it is on the Pareto front and whether it is the final model, and the artifacts
    its model is published as. Listed as the branches measure them; the front, the gates and
    the choice come when the search ends. Empty for a plain job."""
    rows = jobs_service.candidates_of(session, tenant_id=tenant.id, job_id=job_id)
    return CandidatesPublic(data=[CandidatePublic.model_validate(r) for r in rows])


def _artifact_public(request: Request, job_id: str, a) -> ArtifactPublic:
    # Relative to the API, or under the operator's PUBLIC_URL: never built from the request's
    # Host header, which a client (or anyone in front of the API) chooses.
    url = request.app.url_path_for("download_artifact", job_id=job_id, name=a.name)
    public = request.app.state.settings.PUBLIC_URL
    url = f"{public.rstrip('/')}{url}" if public else str(url)
    return ArtifactPublic(
        name=a.name, format=a.format, bytes=a.bytes, sha256=a.sha256, url=url, final=a.final
    )


@router.get(
    "/{job_id}/artifacts",
    response_model=ArtifactsPublic,
    responses=error_responses(*AUTH, JobNotFound, ArtifactsExpired),
)
def list_artifacts(
    job_id: str, request: Request, session: SessionDep, tenant: TenantDep
) -> ArtifactsPublic:
    """The job's files; 410 `artifacts_expired` once retention (`ARTIFACT_TTL_DAYS`) deleted
    them."""
    rows = jobs_service.list_artifacts(session, tenant_id=tenant.id, job_id=job_id)
    return ArtifactsPublic(data=[_artifact_public(request, job_id, a) for a in rows])


_DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {t: {} for t in (downloads.BINARY, *downloads.MEDIA_TYPES.values())},
        "description": "the file, with the Content-Type of its kind (models "
        "application/octet-stream, pareto.png image/png, .json application/json, "
        ".csv text/csv); ETag is its sha256",
    },
    206: {"description": "the requested byte range"},
    307: {"description": "a bucket store: the object's presigned URL (Location)"},
    304: {"description": "If-None-Match matched the ETag"},
    **error_responses(*AUTH, JobNotFound, ArtifactNotFound, ArtifactsExpired, StorageUnavailable),
}


@dataclass(frozen=True)
class DownloadAsk:
    """What a download request asks for besides the file."""

    redirect: bool
    if_none_match: str | None
    range_header: str | None
    if_range: str | None


def download_ask(
    redirect: Annotated[
        bool,
        Query(description="false: the bytes through the API, never a redirect to the store"),
    ] = True,
    if_none_match: Annotated[str | None, Header()] = None,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
    if_range: Annotated[str | None, Header()] = None,
) -> DownloadAsk:
    return DownloadAsk(redirect, if_none_match, range_header, if_range)


DownloadAskDep = Annotated[DownloadAsk, Depends(download_ask)]


@router.get(
    "/{job_id}/artifacts/final",
    name="download_final_artifact",
    response_class=FileResponse,
    responses=_DOWNLOAD_RESPONSES,
)
def download_final_artifact(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    storage: StorageDep,
    settings: SettingsDep,
    ask: DownloadAskDep,
) -> Response:
    """The job's final model, whichever file holds it (`model.int8.onnx` when int8 won,
    `model.onnx` when pruning alone did): a name a script can rely on. Served as
    `/artifacts/{name}` serves that file, under its own name; 404 until the job succeeded."""
    artifact = jobs_service.get_final_artifact(session, tenant_id=tenant.id, job_id=job_id)
    return _serve(job_id, artifact, storage, settings, ask)


@router.get(
    "/{job_id}/artifacts/{name}",
    name="download_artifact",
    response_class=FileResponse,
    responses=_DOWNLOAD_RESPONSES,
)
def download_artifact(
    job_id: str,
    name: str,
    session: SessionDep,
    tenant: TenantDep,
    storage: StorageDep,
    settings: SettingsDep,
    ask: DownloadAskDep,
) -> Response:
    """The file, with `ETag: "<sha256>"`; honours `Range` and `If-Range`. With a bucket as
    the store (`STORAGE_URL=s3://…`) it answers 307 to a presigned URL of the object
    (`DOWNLOAD_MODE=redirect`, the default; ETag as here) unless `redirect=false`."""
    artifact = jobs_service.get_artifact(session, tenant_id=tenant.id, job_id=job_id, name=name)
    return _serve(job_id, artifact, storage, settings, ask)


def _serve(
    job_id: str, artifact: Artifact, storage: Storage, settings: Settings, ask: DownloadAsk
) -> Response:
    name = artifact.name
    etag = f'"{artifact.sha256}"'
    if ask.if_none_match is not None and etag in [t.strip() for t in ask.if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    media = downloads.media_type(name)
    path = storage.local_path(artifact.path)
    if path is None:
        if storage.size(artifact.path) is None:
            raise ArtifactNotFound(f"artifact {name!r} of job {job_id} is missing from storage")
        return downloads.from_store(
            storage,
            settings,
            artifact,
            redirect=ask.redirect,
            range_header=ask.range_header,
            if_range=ask.if_range,
            media_type=media,
        )
    if not path.is_file():
        raise ArtifactNotFound(f"artifact {name!r} of job {job_id} is missing from storage")
    return FileResponse(path, media_type=media, filename=name, headers={"ETag": etag})
