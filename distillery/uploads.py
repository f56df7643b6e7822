"""`distillery submit SPEC` with local files: the dataset or teacher a spec names by path is
uploaded (once: an upload of the same bytes is found by its sha256 and reused) and the spec
is rewritten to name it by id, so a CI job needs one command. Paths are read as `distillery
run` reads them: relative to the current folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillery.cli_support import InputError, upload_progress
from distillery.client import Client, sha256_file

DATASET_SOURCES = ("npz", "imagefolder")
TEACHER_SOURCES = ("torchscript", "onnx", "safetensors")


def upload_local_files(client: Client, spec: Any, *, echo: Callable[[str], None]) -> Any:
    """`spec` with its local dataset and teacher files replaced by upload ids."""
    if not isinstance(spec, dict):
        return spec  # the service will say what is wrong with it
    out = dict(spec)
    dataset = spec.get("dataset")
    if isinstance(dataset, dict) and dataset.get("source") in DATASET_SOURCES:
        path = _local(dataset, "dataset")
        ds_id = _dataset_id(client, path, echo)
        keep = {k: v for k, v in dataset.items() if k not in ("source", "path")}
        out["dataset"] = {"source": "upload", "id": ds_id, **keep}
    teacher = spec.get("teacher")
    if isinstance(teacher, dict) and teacher.get("source") in TEACHER_SOURCES:
        path = _local(teacher, "teacher")
        out["teacher"] = {"source": "upload", "id": _model_id(client, path, teacher, echo)}
    return out


def _local(block: dict[str, Any], field: str) -> Path:
    raw = block.get("path")
    if not isinstance(raw, str) or not raw:
        raise InputError(f"{field}.path: a {block['source']} {field} names a local file")
    path = Path(raw)
    if not path.is_file():
        raise InputError(f"{field}.path: no file {raw!r} (paths are relative to this folder)")
    return path


def _dataset_id(client: Client, path: Path, echo: Callable[[str], None]) -> str:
    digest = sha256_file(path)
    found = client.datasets(sha256=digest, limit=1).data
    if found:
        echo(f"{path}: already uploaded as {found[0].id}")
        return found[0].id
    with upload_progress(path) as progress:
        ds = client.upload_dataset(path, on_progress=progress)
    echo(f"{path}: uploaded as {ds.id} ({ds.num_samples} samples, {ds.num_classes} classes)")
    return ds.id


def _model_id(
    client: Client, path: Path, teacher: dict[str, Any], echo: Callable[[str], None]
) -> str:
    fmt, arch = teacher["source"], teacher.get("arch")
    arch_kwargs = teacher.get("arch_kwargs") or {}
    digest = sha256_file(path)
    for m in client.models(sha256=digest, limit=20).data:
        # The same bytes uploaded as the same kind of teacher: reuse it.
        if m.format == fmt and m.arch == arch and m.arch_kwargs == arch_kwargs:
            echo(f"{path}: already uploaded as {m.id}")
            return m.id
    with upload_progress(path) as progress:
        m = client.upload_model(
            path, format=fmt, arch=arch, arch_kwargs=arch_kwargs or None, on_progress=progress
        )
    echo(f"{path}: uploaded as {m.id} ({m.format})")
    return m.id
