from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import LOADED, SessionDep, SettingsDep, StorageDep, TenantDep, UnitOfWorkRoute
from app.api.upload import UploadTenantDep, in_session, uploaded_file
from app.core.config import Settings
from app.core.errors import (
    DatasetNotFound,
    InsufficientStorage,
    ModelNotFound,
    PayloadTooLarge,
    StorageUnavailable,
    Unauthorized,
    UploadInUse,
    UploadInvalid,
    UploadTimeout,
    error_responses,
)
from app.core.storage import Storage
from app.models import Dataset, UploadedModel
from app.schemas.uploads import DatasetPublic, DatasetsPublic, ModelPublic, ModelsPublic
from app.services import uploads as uploads_service

router = APIRouter(tags=["uploads"], route_class=UnitOfWorkRoute, responses=LOADED)

_FILE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "format": {
                            "type": "string",
                            "enum": ["torchscript", "onnx", "safetensors"],
                            "description": "models: when the file name does not say",
                        },
                        "arch": {
                            "type": "string",
                            "description": "models: the registered arch of safetensors weights",
                        },
                        "arch_kwargs": {
                            "type": "string",
                            "description": "models: JSON object of arch arguments",
                        },
                        "input_shape": {
                            "type": "string",
                            "description": "models: C,H,W or D (checked against a job's dataset)",
                        },
                        "num_classes": {
                            "type": "integer",
                            "description": "models: number of outputs",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "/v1/datasets",
    status_code=201,
    response_model=DatasetPublic,
    openapi_extra=_FILE_BODY,
    responses=error_responses(
        Unauthorized,
        PayloadTooLarge,
        UploadInvalid,
        UploadTimeout,
        InsufficientStorage,
        StorageUnavailable,
    ),
)
async def upload_dataset(
    request: Request,
    tenant: UploadTenantDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> DatasetPublic:
    """Upload a `.npz` (`x`: N,C,H,W images or N,D rows; `y`: labels; optional `classes`) or an
    ImageFolder `.zip` / `.tar.gz` in one request of up to MAX_UPLOAD_BYTES (larger files: in
    parts, `POST /v1/uploads`). It is validated and described now; jobs use its id. An
    archive that would expand absurdly (a bomb) is refused from its headers. A refusal before
    the whole body is read (413, 507, 401) closes the connection."""
    async with uploaded_file(request, **_receive(settings, storage)) as received:
        row = await run_in_threadpool(
            lambda: uploads_service.inspect_dataset(
                tmp_path=received.path,
                filename=received.filename,
                storage=storage,
                settings=settings,
            )
        )
        row = await _store(request, row, tenant.id, received.path, storage)
    return DatasetPublic.model_validate(row)


def _receive(settings: Settings, storage: Storage) -> dict[str, Any]:
    return {
        "max_bytes": settings.MAX_UPLOAD_BYTES,
        "tmp_dir": storage.tmp_dir(),
        "reserve": settings.UPLOAD_DISK_RESERVE_BYTES,
        "timeout": settings.UPLOAD_READ_TIMEOUT_SECONDS,
    }


async def _store(request: Request, row, tenant_id: str, path, storage: Storage):
    return await in_session(
        request,
        uploads_service.store_upload,
        row=row,
        tenant_id=tenant_id,
        tmp_path=path,
        storage=storage,
    )


Limit = Annotated[int, Query(ge=1, le=200)]
After = Annotated[
    str | None, Query(max_length=64, description="id of the last item of the previous page")
]
Sha256 = Annotated[
    str | None,
    Query(pattern="^[0-9a-fA-F]{64}$", description="only uploads of the bytes with this sha256"),
]


@router.get(
    "/v1/datasets",
    response_model=DatasetsPublic,
    responses=error_responses(Unauthorized, DatasetNotFound),
)
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 20,
    after: After = None,
    sha256: Sha256 = None,
) -> DatasetsPublic:
    """The tenant's datasets, newest first; page with `after`=`next_after`. `sha256` finds an
    upload of the same bytes (the CLI reuses it instead of uploading again)."""
    rows, has_more = uploads_service.list_uploads(
        session, model=Dataset, tenant_id=tenant.id, limit=limit, after=after, sha256=sha256
    )
    data = [DatasetPublic.model_validate(r) for r in rows]
    return DatasetsPublic(data=data, has_more=has_more, next_after=_next(data, has_more))


def _next(data: list, has_more: bool) -> str | None:
    return data[-1].id if has_more and data else None


@router.delete(
    "/v1/datasets/{dataset_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(Unauthorized, DatasetNotFound, UploadInUse),
)
def delete_dataset(
    dataset_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep
) -> Response:
    """Delete a dataset and its file. 409 `upload_in_use` while a queued or running job names
    it; finished jobs keep their records and artifacts."""
    uploads_service.delete_upload(
        session, model=Dataset, tenant_id=tenant.id, upload_id=dataset_id, storage=storage
    )
    return Response(status_code=204)


@router.get(
    "/v1/datasets/{dataset_id}",
    response_model=DatasetPublic,
    responses=error_responses(Unauthorized, DatasetNotFound),
)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetPublic:
    return DatasetPublic.model_validate(
        uploads_service.get_dataset(session, tenant_id=tenant.id, dataset_id=dataset_id)
    )


@router.post(
    "/v1/models",
    status_code=201,
    response_model=ModelPublic,
    openapi_extra=_FILE_BODY,
    responses=error_responses(
        Unauthorized,
        PayloadTooLarge,
        UploadInvalid,
        UploadTimeout,
        InsufficientStorage,
        StorageUnavailable,
    ),
)
async def upload_model(
    request: Request,
    tenant: UploadTenantDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> ModelPublic:
    """Upload a teacher: a TorchScript archive, an ONNX model, or safetensors weights with
    `arch`, in one request of up to MAX_UPLOAD_BYTES (larger: `POST /v1/uploads`). Pickled
    checkpoints are refused. The file is inspected, not executed, here."""
    async with uploaded_file(request, **_receive(settings, storage)) as received:
        row = await run_in_threadpool(
            lambda: uploads_service.inspect_model(
                tmp_path=received.path,
                filename=received.filename,
                fields=received.fields,
                limits=settings.spec_limits(),
            )
        )
        row = await _store(request, row, tenant.id, received.path, storage)
    return ModelPublic.model_validate(row)


@router.get(
    "/v1/models",
    response_model=ModelsPublic,
    responses=error_responses(Unauthorized, ModelNotFound),
)
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    limit: Limit = 20,
    after: After = None,
    sha256: Sha256 = None,
) -> ModelsPublic:
    """The tenant's uploaded teachers, newest first; paged and filtered like datasets."""
    rows, has_more = uploads_service.list_uploads(
        session, model=UploadedModel, tenant_id=tenant.id, limit=limit, after=after, sha256=sha256
    )
    data = [ModelPublic.model_validate(r) for r in rows]
    return ModelsPublic(data=data, has_more=has_more, next_after=_next(data, has_more))


@router.delete(
    "/v1/models/{model_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(Unauthorized, ModelNotFound, UploadInUse),
)
def delete_model(
    model_id: str, session: SessionDep, tenant: TenantDep, storage: StorageDep
) -> Response:
    """Delete an uploaded teacher and its file; 409 `upload_in_use` while a live job uses it."""
    uploads_service.delete_upload(
        session, model=UploadedModel, tenant_id=tenant.id, upload_id=model_id, storage=storage
    )
    return Response(status_code=204)


@router.get(
    "/v1/models/{model_id}",
    response_model=ModelPublic,
    responses=error_responses(Unauthorized, ModelNotFound),
)
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelPublic:
    return ModelPublic.model_validate(
        uploads_service.get_model(session, tenant_id=tenant.id, model_id=model_id)
    )
