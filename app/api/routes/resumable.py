"""Resumable uploads (app/services/resumable.py): create, send parts, complete, abort."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import LOADED, SessionDep, SettingsDep, StorageDep, TenantDep, UnitOfWorkRoute
from app.api.upload import UploadTenantDep, in_session, receive_part
from app.core.errors import (
    InsufficientStorage,
    PayloadTooLarge,
    StorageUnavailable,
    Unauthorized,
    UploadInvalid,
    UploadNotFound,
    UploadStateConflict,
    UploadTimeout,
    error_responses,
)
from app.models import Dataset
from app.services import resumable
from distillery.schemas import (
    DatasetPublic,
    ModelPublic,
    UploadCreate,
    UploadPartPublic,
    UploadPublic,
)

router = APIRouter(tags=["uploads"], route_class=UnitOfWorkRoute, responses=LOADED)

PartNumber = Annotated[int, Path(ge=1, le=10_000, description="from 1")]

_PART_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "/v1/uploads",
    status_code=201,
    response_model=UploadPublic,
    responses=error_responses(
        Unauthorized, PayloadTooLarge, UploadInvalid, InsufficientStorage, StorageUnavailable
    ),
)
def create_upload(
    body: UploadCreate,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> UploadPublic:
    """Start a resumable upload of a dataset or teacher file of up to
    MAX_RESUMABLE_UPLOAD_BYTES (20 GiB by default), sent in parts of `part_bytes`. Refused
    before any part is sent when it is too big (413) or the API's disk cannot hold it (507).
    Then PUT each part (`PUT /v1/uploads/{id}/parts/{n}`, or on a bucket store the presigned
    `part_urls`), in any order, again after a cut connection, and `complete` it. Unfinished
    uploads expire after UPLOAD_SESSION_TTL_HOURS."""
    row = resumable.create(
        session, tenant_id=tenant.id, body=body, storage=storage, settings=settings
    )
    return resumable.describe(row, storage, settings)


@router.get(
    "/v1/uploads/{upload_id}",
    response_model=UploadPublic,
    responses=error_responses(Unauthorized, UploadNotFound, StorageUnavailable),
)
def get_upload(
    upload_id: str,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> UploadPublic:
    """Which parts the server (or the bucket) holds: a client resuming a cut upload sends
    only the others. On a bucket store, fresh presigned URLs for up to 100 missing parts."""
    row = resumable.get(session, tenant_id=tenant.id, upload_id=upload_id)
    return resumable.describe(row, storage, settings)


@router.put(
    "/v1/uploads/{upload_id}/parts/{number}",
    response_model=UploadPartPublic,
    openapi_extra=_PART_BODY,
    responses=error_responses(
        Unauthorized,
        UploadNotFound,
        UploadInvalid,
        UploadStateConflict,
        UploadTimeout,
        InsufficientStorage,
    ),
)
async def put_part(
    upload_id: str,
    number: PartNumber,
    request: Request,
    tenant: UploadTenantDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> UploadPartPublic:
    """Send part `number`: exactly `part_bytes` bytes (the last part: the rest of the file) as
    the raw body. Sending a part again replaces it. A part cut off midway is not recorded.
    On a bucket store, parts go to the presigned `part_urls` instead (409 here)."""
    row = await in_session(request, resumable.get, tenant_id=tenant.id, upload_id=upload_id)
    target = resumable.part_target(row, number, storage)
    await receive_part(
        request,
        path=target.path,
        offset=target.offset,
        length=target.length,
        timeout=settings.UPLOAD_READ_TIMEOUT_SECONDS,
    )
    return await run_in_threadpool(resumable.mark_part, row, number, target.length, storage)


@router.post(
    "/v1/uploads/{upload_id}/complete",
    status_code=201,
    response_model=DatasetPublic | ModelPublic,
    responses=error_responses(
        Unauthorized,
        UploadNotFound,
        UploadInvalid,
        UploadStateConflict,
        InsufficientStorage,
        StorageUnavailable,
    ),
)
async def complete_upload(
    upload_id: str,
    request: Request,
    tenant: UploadTenantDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> DatasetPublic | ModelPublic:
    """Assemble the parts, check the size and the declared sha256, and inspect the file as
    POST /v1/datasets or /v1/models does: the answer is the same dataset or model. 409 while
    parts are missing (the message lists them). A refused file is discarded with its parts.
    Completing again returns the same object."""
    result = await run_in_threadpool(
        lambda: resumable.complete(
            request.app.state.db,
            tenant_id=tenant.id,
            upload_id=upload_id,
            storage=storage,
            settings=settings,
        )
    )
    if isinstance(result, Dataset):
        return DatasetPublic.model_validate(result)
    return ModelPublic.model_validate(result)


@router.delete(
    "/v1/uploads/{upload_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(Unauthorized, UploadNotFound, UploadStateConflict),
)
def abort_upload(
    upload_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep
) -> Response:
    """Abort an unfinished upload: its parts are deleted (on a bucket, the multipart upload
    is aborted)."""
    resumable.abort(session, tenant_id=tenant.id, upload_id=upload_id, storage=storage)
    return Response(status_code=204)
