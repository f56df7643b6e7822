"""Upload ids in a spec -> the files the pipeline reads. Only a worker opens a user's model."""

from __future__ import annotations

from typing import Any

from app.core.errors import NotFound
from app.models import Dataset, UploadedModel
from app.services import uploads as uploads_service
from worker.jobfolder import local_input
from worker.pipeline.errors import PipelineError
from worker.pipeline.spec import (
    DatasetCommon,
    ImageFolderDataset,
    JobSpec,
    NpzDataset,
    OnnxTeacher,
    SafetensorsInit,
    SafetensorsTeacher,
    TorchScriptTeacher,
    TorchvisionDataset,
    UploadedDataset,
    UploadedInit,
    UploadedTeacher,
)
from worker.runtime import Runtime


def resolve_uploads(runtime: Runtime, spec: JobSpec, tenant_id: str) -> JobSpec:
    """`spec` with its uploaded dataset and teacher turned into file specs under storage, and
    a torchvision dataset read from this worker's DATA_ROOT."""
    updates: dict[str, Any] = {}
    if isinstance(spec.dataset, TorchvisionDataset):  # the service's data root, never the spec's
        updates["dataset"] = spec.dataset.model_copy(
            update={"root": str(runtime.settings.data_root)}
        )
    with runtime.db.session() as s:
        try:
            if isinstance(spec.dataset, UploadedDataset):
                row = uploads_service.get_dataset(
                    s, tenant_id=tenant_id, dataset_id=spec.dataset.id
                )
                updates["dataset"] = _dataset(spec.dataset, row, _local(runtime, row))
            if isinstance(spec.teacher, UploadedTeacher):
                row = uploads_service.get_model(s, tenant_id=tenant_id, model_id=spec.teacher.id)
                updates["teacher"] = _teacher(row, _local(runtime, row))
            updates.update(_inits(runtime, s, spec, updates, tenant_id))
        except NotFound as e:  # deleted since the job was submitted
            raise PipelineError(f"{e.message}: it no longer exists") from None
    return spec.model_copy(update=updates) if updates else spec


def _inits(runtime: Runtime, s, spec: JobSpec, updates: dict, tenant_id: str) -> dict[str, Any]:
    """Starting weights named by upload id (students, a trained teacher) -> their files."""

    def resolved(model: Any) -> Any:
        init = getattr(model, "init", None)
        if not isinstance(init, UploadedInit):
            return model
        row = uploads_service.get_model(s, tenant_id=tenant_id, model_id=init.id)
        path = SafetensorsInit(source="safetensors", path=_local(runtime, row))
        return model.model_copy(update={"init": path})

    out: dict[str, Any] = {}
    if spec.student is not None:
        out["student"] = resolved(spec.student)
    teacher = updates.get("teacher", spec.teacher)
    out["teacher"] = resolved(teacher)
    if spec.search is not None and spec.search.student is not None:
        students = [resolved(st) for st in spec.search.student]
        out["search"] = spec.search.model_copy(update={"student": students})
    return out


def _local(runtime: Runtime, row: Dataset | UploadedModel) -> str:
    return str(local_input(runtime.storage, runtime.settings.work_dir, row.path, row.sha256))


def _dataset(ds: UploadedDataset, row: Dataset, path: str) -> NpzDataset | ImageFolderDataset:
    # Every split setting carries over (val_fraction was once dropped here).
    common = {**{k: getattr(ds, k) for k in DatasetCommon.model_fields}, "path": path}
    if row.kind == "npz":
        return NpzDataset(source="npz", **common)
    return ImageFolderDataset(
        source="imagefolder", image_size=ds.image_size, grayscale=ds.grayscale, **common
    )


def _teacher(
    row: UploadedModel, path: str
) -> TorchScriptTeacher | OnnxTeacher | SafetensorsTeacher:
    if row.format == "torchscript":
        return TorchScriptTeacher(source="torchscript", path=path)
    if row.format == "onnx":
        return OnnxTeacher(source="onnx", path=path)
    return SafetensorsTeacher(
        source="safetensors", path=path, arch=row.arch, arch_kwargs=row.arch_kwargs
    )
