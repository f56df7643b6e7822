"""Uploaded datasets and teachers: validated and described at upload, stored per tenant.

Datasets are parsed here (numpy without pickle; archives extracted safely) to record their
shape, classes and sample count. Models are only inspected, never executed: a TorchScript
archive's layout and CRCs, an ONNX graph's declared inputs/outputs, a safetensors header.
Workers are the only processes that load a user's model.
"""

from __future__ import annotations

import json
import lzma
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, select, tuple_
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import DatasetNotFound, ModelNotFound, NotFound, UploadInUse, UploadInvalid
from app.core.storage import Storage, remove_after_commit, safe_filename, upload_key
from app.jobs.states import TERMINAL
from app.models import Dataset, Job, UploadedModel
from worker.pipeline.archives import check_expansion
from worker.pipeline.errors import PipelineError, SpecError
from worker.pipeline.files import sha256_file
from worker.pipeline.limits import SpecLimits, check_structure

DATASET_KINDS = {
    ".npz": "npz",
    ".zip": "imagefolder",
    ".tar.gz": "imagefolder",
    ".tgz": "imagefolder",
    ".tar": "imagefolder",
}
MAX_NUM_CLASSES = 1_000_000
MODEL_FORMATS = {
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".ts": "torchscript",
    ".onnx": "onnx",
    ".safetensors": "safetensors",
}


def _suffix(name: str, table: dict[str, str]) -> str | None:
    lower = name.lower()
    return next((v for k, v in table.items() if lower.endswith(k)), None)


def dataset_kind(filename: str) -> str | None:
    """npz | imagefolder, from the file's name; None when it is neither."""
    return _suffix(filename, DATASET_KINDS)


def _describe_dataset(
    path: Path, kind: str, settings: Settings, workdir: Path, filename: str
) -> dict[str, Any]:
    # The ML side (torch, torchvision) loads only once a dataset is inspected.
    from worker.pipeline.checks import check_label_range
    from worker.pipeline.imagecache import inspect_imagefolder
    from worker.pipeline.npz import inspect_npz

    if kind == "npz":
        # Streamed, never held whole: a 1.5 MB compressed file may expand to gigabytes.
        npz = inspect_npz(path, max_total_bytes=settings.MAX_ARCHIVE_BYTES)
        counts, names, shape = npz.counts, npz.class_names, npz.input_shape
    else:
        # The upload sits under a temporary name; a link named like the uploader's file lets
        # the extractor go by its suffix (a truncated .zip is then called corrupt, not "not an
        # archive") and its messages name the file the uploader knows.
        named = workdir / safe_filename(filename)
        named.symlink_to(path)
        # Headers only (format, size, mode), no pixel decoded: 20,000 photos cost seconds, not
        # minutes of the API's CPU. An image damaged past its header fails the job's data
        # stage, which names it.
        folder = inspect_imagefolder(
            named,
            workdir,
            max_members=settings.MAX_ARCHIVE_MEMBERS,
            max_total_bytes=settings.MAX_ARCHIVE_BYTES,
        )
        names = folder.classes
        num_classes = check_label_range(0, len(names) - 1, len(folder.labels), names)
        shape = [3, 32, 32]  # resized per job (dataset.image_size); channels per dataset.grayscale
        counts = [int(c) for c in np.bincount(folder.labels, minlength=num_classes)]
    if min(counts) < 2:
        raise UploadInvalid(
            f"class {counts.index(min(counts))} has {min(counts)} sample(s); each class needs at least 2"
        )
    return {
        "num_samples": sum(counts),
        "num_classes": len(counts),
        "input_shape": shape,
        "class_names": names or [str(i) for i in range(len(counts))],
    }


def inspect_dataset(
    *,
    tmp_path: Path,
    filename: str,
    storage: Storage,
    settings: Settings,
    sha256: str | None = None,
) -> Dataset:
    """Validate and describe an uploaded dataset (no database): the row to store, or
    UploadInvalid. An archive whose headers promise a bomb is refused before extraction."""
    kind = dataset_kind(filename)
    if kind is None:
        raise UploadInvalid(
            f"{filename}: expected a .npz file or an ImageFolder .zip / .tar.gz archive"
        )
    try:
        if kind == "imagefolder":
            check_expansion(
                tmp_path,
                max_total_bytes=settings.MAX_ARCHIVE_BYTES,
                max_ratio=settings.MAX_ARCHIVE_RATIO,
                name=filename,
            )
        with tempfile.TemporaryDirectory(dir=storage.tmp_dir()) as work:
            meta = _describe_dataset(tmp_path, kind, settings, Path(work), filename)
    except PipelineError as e:
        raise UploadInvalid(e.message.replace(tmp_path.name, filename)) from None
    return Dataset(
        filename=safe_filename(filename),
        kind=kind,
        path="",
        bytes=tmp_path.stat().st_size,
        sha256=sha256 or sha256_file(tmp_path),
        **meta,
    )


def _onnx_meta(path: Path, filename: str) -> tuple[list[int] | None, int | None]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:
        raise UploadInvalid(
            f"{filename}: not a valid ONNX model ({str(e).splitlines()[0][:200]})"
        ) from None
    # External data would make ONNX Runtime read files named by the uploader: refuse it.
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise UploadInvalid(
            f"{filename}: ONNX models with external data files are not accepted; embed the weights"
        )
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise UploadInvalid(
            f"{filename}: the model must take exactly one input tensor (it takes {len(inputs)})"
        )

    def dims(value_info) -> list[int | None]:
        return [
            d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim
        ]

    in_dims, out_dims = dims(inputs[0]), dims(model.graph.output[0])
    in_shape = (
        [int(d) for d in in_dims[1:]] if len(in_dims) > 1 and all(d for d in in_dims[1:]) else None
    )
    classes = int(out_dims[-1]) if len(out_dims) == 2 and out_dims[-1] else None
    return in_shape, classes


def _safetensors_check(path: Path, filename: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if not list(f.keys()):
                raise UploadInvalid(f"{filename}: holds no tensors")
    except UploadInvalid:
        raise
    except Exception as e:
        raise UploadInvalid(f"{filename}: not a safetensors file ({str(e)[:200]})") from None


# What TorchScript's own unpickler resolves (torch/csrc/jit/serialization/unpickler.cpp):
# its compiled classes, tensor and storage rebuilders, a few containers. Any other global in a
# .pkl member belongs to a Python pickle naming arbitrary callables, which torch.jit.load would
# refuse anyway; refusing it here keeps it out of storage and away from every worker.
_TORCHSCRIPT_GLOBAL_PREFIXES = ("__torch__.", "torch._utils.", "torch.jit._pickle.")
_TORCHSCRIPT_GLOBALS = {
    "collections.OrderedDict",
    "builtins.complex",
    "builtins.set",
    "torch.device",
    "torch._tensor._rebuild_from_type_v2",
    # quantization schemes of quantized tensors
    "torch.per_tensor_affine",
    "torch.per_channel_affine",
    "torch.per_tensor_symmetric",
    "torch.per_channel_symmetric",
    "torch.per_channel_affine_float_qparams",
}
MAX_TORCHSCRIPT_PICKLE_BYTES = 64 * 1024**2  # structure only: tensor data lives in data/


def _torchscript_global(module: str, name: str) -> bool:
    qualified = f"{module}.{name}"
    return (
        qualified.startswith(_TORCHSCRIPT_GLOBAL_PREFIXES)
        or qualified in _TORCHSCRIPT_GLOBALS
        or (module == "torch" and name.endswith("Storage"))
    )


def _check_pickle_opcode(where: str, op: str, arg: Any) -> None:
    if op in ("GLOBAL", "INST"):
        module, _, name = str(arg).partition(" ")
        if not _torchscript_global(module, name):
            raise UploadInvalid(
                f"{where} is a Python pickle that would call {module}.{name}; "
                "pickled checkpoints are not accepted"
            )
    elif op in ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4"):  # TorchScript's pickles never use them
        raise UploadInvalid(
            f"{where} is a Python pickle (opcode {op}); pickled checkpoints are not accepted"
        )


def _check_torchscript_pickles(path: Path, filename: str) -> None:
    """Read (never load) each .pkl member's opcodes; refuse globals TorchScript never uses."""
    import pickletools

    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".pkl"):
                continue
            where = f"{filename}: member {info.filename!r}"
            if info.file_size > MAX_TORCHSCRIPT_PICKLE_BYTES:
                raise UploadInvalid(f"{where} is {info.file_size} bytes; not a TorchScript archive")
            with zf.open(info) as member:
                try:
                    for op, arg, _ in pickletools.genops(member):
                        _check_pickle_opcode(where, op.name, arg)
                except ValueError as e:  # malformed opcodes (a short read is zipfile's EOFError)
                    raise UploadInvalid(f"{where} is not a readable pickle ({e})") from None


def _safetensors_arch_kwargs(arch: str | None, raw: str | None, limits: SpecLimits) -> dict:
    """The arch_kwargs of safetensors weights, checked as a spec's would be (names, values,
    and the structural limits: a job building this arch must not be unbounded)."""
    from worker.pipeline.archs import ARCHS
    from worker.pipeline.spec import check_arch_kwargs

    if arch is None:
        raise UploadInvalid(
            f"arch: safetensors holds weights only; name the architecture (one of {', '.join(ARCHS.names())})"
        )
    if arch not in ARCHS:
        raise UploadInvalid(f"arch: unknown arch {arch!r}; known: {', '.join(ARCHS.names())}")
    try:
        arch_kwargs = json.loads(raw or "{}")
        if not isinstance(arch_kwargs, dict):
            raise ValueError("must be a JSON object")
        check_arch_kwargs(arch, arch_kwargs)
        check_structure(arch_kwargs, where="arch_kwargs", limits=limits)
    except RecursionError:
        raise UploadInvalid("arch_kwargs: nested too deeply") from None
    except SpecError as e:
        raise UploadInvalid(e.message) from None
    except ValueError as e:
        raise UploadInvalid(f"arch_kwargs: {e}") from None
    return arch_kwargs


def _parse_shape(raw: str | None) -> list[int] | None:
    if raw in (None, ""):
        return None
    try:
        shape = [int(v) for v in raw.replace("[", "").replace("]", "").split(",") if v.strip()]
    except ValueError:
        raise UploadInvalid(
            f"input_shape: expected comma-separated integers like 3,32,32, got {raw!r}"
        ) from None
    if not shape or any(d <= 0 for d in shape) or len(shape) not in (1, 3):
        raise UploadInvalid(f"input_shape: expected C,H,W or D (without the batch), got {raw!r}")
    return shape


def _parse_classes(raw: str | None) -> int | None:
    if raw in (None, ""):
        return None
    # isdecimal, not isdigit: int() refuses digits like '²' that isdigit accepts; the length
    # check keeps int() off a 5000-digit string.
    plausible = raw.isdecimal() and len(raw) <= len(str(MAX_NUM_CLASSES))
    if not (plausible and 2 <= int(raw) <= MAX_NUM_CLASSES):
        raise UploadInvalid(
            f"num_classes: expected an integer from 2 to {MAX_NUM_CLASSES}, got {raw[:40]!r}"
        )
    return int(raw)


def _check_torchscript(tmp_path: Path, filename: str) -> None:
    from worker.pipeline.errors import ModelLoadError
    from worker.pipeline.teacher import check_torchscript_archive

    try:
        check_torchscript_archive(tmp_path)
        _check_torchscript_pickles(tmp_path, filename)
    except ModelLoadError as e:
        raise UploadInvalid(e.message.replace(tmp_path.name, filename)) from None
    except (zlib.error, lzma.LZMAError, EOFError, RuntimeError, NotImplementedError) as e:
        # A damaged compressed member (zipfile lets zlib/lzma errors through), an encrypted
        # one (RuntimeError) or an unsupported compression method.
        raise UploadInvalid(f"{filename}: corrupt TorchScript archive ({e})") from None


def store_upload(
    session: Session,
    row: Dataset | UploadedModel,
    *,
    tenant_id: str,
    tmp_path: Path,
    storage: Storage,
    stored_key: str | None = None,
) -> Dataset | UploadedModel:
    """Give an inspected row its tenant and id, then move the upload under it into the store
    (a StorageError rolls the row back: no upload is listed whose file the store lacks).
    `stored_key`: the file is in the store already (a bucket's multipart upload), under the
    key the row's id names."""
    folder = KINDS[type(row)][0]
    row.tenant_id = tenant_id
    session.add(row)
    session.flush()
    row.path = upload_key(tenant_id, folder, row.id, row.filename)
    if stored_key is None:
        storage.put_file(row.path, tmp_path, move=True)
    elif stored_key != row.path:
        raise ValueError(f"the stored key {stored_key!r} is not the row's {row.path!r}")
    return row


def inspect_model(
    *,
    tmp_path: Path,
    filename: str,
    fields: dict[str, str],
    limits: SpecLimits,
    sha256: str | None = None,
) -> UploadedModel:
    """Inspect (never load) an uploaded teacher (no database): the row to store, or
    UploadInvalid."""
    fmt = fields.get("format") or _suffix(filename, MODEL_FORMATS)
    if fmt not in ("torchscript", "onnx", "safetensors"):
        raise UploadInvalid(
            f"format: cannot tell the format of {filename!r}; name it .pt (TorchScript), .onnx or .safetensors, "
            "or pass format=torchscript|onnx|safetensors. Pickled checkpoints are not accepted."
        )
    input_shape = _parse_shape(fields.get("input_shape"))
    classes = _parse_classes(fields.get("num_classes"))
    arch, arch_kwargs = fields.get("arch") or None, {}
    if fmt == "torchscript":
        _check_torchscript(tmp_path, filename)
    elif fmt == "onnx":
        onnx_shape, onnx_classes = _onnx_meta(tmp_path, filename)
        input_shape = input_shape or onnx_shape
        classes = classes or onnx_classes
    else:
        _safetensors_check(tmp_path, filename)
        arch_kwargs = _safetensors_arch_kwargs(arch, fields.get("arch_kwargs"), limits)
    return UploadedModel(
        filename=safe_filename(filename),
        format=fmt,
        arch=arch,
        arch_kwargs=arch_kwargs,
        path="",
        bytes=tmp_path.stat().st_size,
        sha256=sha256 or sha256_file(tmp_path),
        input_shape=input_shape,
        num_classes=classes,
    )


def get_dataset(session: Session, *, tenant_id: str, dataset_id: str) -> Dataset:
    row = session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    )
    if row is None:
        raise DatasetNotFound(f"no dataset {dataset_id!r}")
    return row


def get_model(session: Session, *, tenant_id: str, model_id: str) -> UploadedModel:
    row = session.scalar(
        select(UploadedModel).where(
            UploadedModel.id == model_id, UploadedModel.tenant_id == tenant_id
        )
    )
    if row is None:
        raise ModelNotFound(f"no model {model_id!r}")
    return row


# --- list and delete -------------------------------------------------------------------------

# Per kind of upload: its storage folder, the spec field that names it, its noun, and the
# error for an id that is not there.
KINDS: dict[type, tuple[str, str, str, type[NotFound]]] = {
    Dataset: ("datasets", "dataset", "dataset", DatasetNotFound),
    UploadedModel: ("models", "teacher", "model", ModelNotFound),
}


def list_uploads(
    session: Session,
    *,
    model: type[Dataset] | type[UploadedModel],
    tenant_id: str,
    limit: int,
    after: str | None,
    sha256: str | None = None,
) -> tuple[list[Any], bool]:
    """A tenant's uploads newest first, `limit` per page, `after` the id of the previous
    page's last; keyset on (created_at, id). `sha256` finds uploads of the same bytes."""
    query = select(model).where(model.tenant_id == tenant_id)
    if sha256 is not None:
        query = query.where(model.sha256 == sha256.lower())
    if after is not None:
        cursor = session.execute(
            select(model.created_at, model.id).where(
                model.id == after, model.tenant_id == tenant_id
            )
        ).first()
        if cursor is None:
            _, _, noun, not_found = KINDS[model]
            raise not_found(f"no {noun} {after!r} to page after")
        query = query.where(tuple_(model.created_at, model.id) < tuple(cursor))
    order = (model.created_at.desc(), model.id.desc())
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def uploads_named(spec: dict[str, Any] | None) -> set[tuple[str, str]]:
    """(spec field, upload id) of each upload a job's spec names: its dataset, its teacher,
    and starting weights (a model upload, counted under "teacher": the field of models)."""
    spec = spec or {}
    students = (spec.get("search") or {}).get("student") or []
    blocks = [("dataset", spec.get("dataset")), ("teacher", spec.get("teacher"))]
    for model in [spec.get("student"), spec.get("teacher"), *students]:
        if isinstance(model, dict):
            blocks.append(("teacher", model.get("init")))
    return {
        (field, block["id"])
        for field, block in blocks
        if isinstance(block, dict)
        and block.get("source") == "upload"
        and isinstance(block.get("id"), str)
    }


def jobs_using(session: Session, *, tenant_id: str, field: str, upload_id: str) -> list[str]:
    """Queued or running jobs of the tenant whose spec names the upload in `field`."""
    rows = session.execute(
        select(Job.id, Job.spec).where(Job.tenant_id == tenant_id, Job.status.not_in(TERMINAL))
    ).all()
    return [job_id for job_id, spec in rows if (field, upload_id) in uploads_named(spec)]


def _lock_unused(
    session: Session, model: type[Dataset] | type[UploadedModel], tenant_id: str, upload_id: str
) -> str:
    """Lock the upload's row (a job being submitted with it waits, then finds it gone) and
    check that no queued or running job names it; returns its storage folder."""
    kind, field, noun, not_found = KINDS[model]
    row = session.scalar(
        select(model).where(model.id == upload_id, model.tenant_id == tenant_id).with_for_update()
    )
    if row is None:
        raise not_found(f"no {noun} {upload_id!r}")
    users = jobs_using(session, tenant_id=tenant_id, field=field, upload_id=upload_id)
    if users:
        raise UploadInUse(
            f"{upload_id} is used by {len(users)} job(s) not finished yet ({', '.join(users[:5])}); "
            "cancel them or wait for them to end"
        )
    return upload_key(tenant_id, kind, upload_id)


def delete_upload(
    session: Session,
    *,
    model: type[Dataset] | type[UploadedModel],
    tenant_id: str,
    upload_id: str,
    storage: Storage,
) -> None:
    """Delete an upload and, once that has committed, its file. Refused (409) while a
    queued or running job names it; a finished job keeps its record and artifacts."""
    folder = _lock_unused(session, model, tenant_id, upload_id)
    session.execute(delete(model).where(model.id == upload_id))
    remove_after_commit(session, storage, [folder])


def expire_upload(
    session: Session,
    *,
    model: type[Dataset] | type[UploadedModel],
    tenant_id: str,
    upload_id: str,
    storage: Storage,
) -> None:
    """Retention's delete: the files first, then the row, so a store that fails (a
    StorageError, raised) leaves the row for the next pass rather than orphaned files.
    UploadInUse / NotFound as for `delete_upload`."""
    storage.delete_prefix(_lock_unused(session, model, tenant_id, upload_id))
    session.execute(delete(model).where(model.id == upload_id))
