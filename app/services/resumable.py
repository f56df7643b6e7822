"""Resumable uploads: a dataset or teacher file sent in numbered parts, any of which can be sent
again after a cut connection, then completed into the same Dataset / UploadedModel that
POST /v1/datasets or /v1/models makes (the same inspection, the same object).

Where the parts go depends on the store:
- a local folder: the API writes each part into one file allocated whole at creation
  (`<tmp>/resumable/<id>/data`); a marker per part (`parts/<n>`) says it arrived whole;
- a bucket: an S3 multipart upload of the final key; the client PUTs each part straight to
  the bucket with a presigned URL and the API never sees the bytes until it completes them
  (the bucket assembles; the API reads the object once to verify and inspect it).
Which parts are there is read from the store (markers, or S3's ListParts), never kept twice.
An upload not completed within UPLOAD_SESSION_TTL_HOURS is removed by the reaper
(`ExpireUploads`).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database
from app.core.disk import disk_full_is_507, ensure_disk
from app.core.errors import (
    PayloadTooLarge,
    UploadInvalid,
    UploadNotFound,
    UploadStateConflict,
)
from app.core.storage import Storage, StorageError, safe_filename, upload_key
from app.models import Dataset, UploadedModel, UploadSession, new_id, utcnow
from app.services import uploads
from distillery.schemas import MAX_UPLOAD_PARTS, UploadCreate, UploadPartPublic, UploadPublic
from worker.pipeline.files import sha256_file

log = logging.getLogger("distillery.uploads")

DEFAULT_PART_BYTES = 16 * 1024**2
URLS_PER_ANSWER = 100  # presigned part URLs per answer: signing 10,000 would take seconds
ROW_KINDS = {"dataset": Dataset, "model": UploadedModel}


def _folder(storage: Storage, upload_id: str) -> Path:
    return storage.tmp_dir() / "resumable" / upload_id


def _data(storage: Storage, upload_id: str) -> Path:
    return _folder(storage, upload_id) / "data"


def bucket_key(row: UploadSession) -> str:
    """The final key of the upload: the one the completed dataset or model will have."""
    folder = uploads.KINDS[ROW_KINDS[row.kind]][0]
    return upload_key(row.tenant_id, folder, row.target_id, safe_filename(row.filename))


def parts_total(row: UploadSession) -> int:
    return math.ceil(row.bytes / row.part_bytes)


def part_span(row: UploadSession, number: int) -> tuple[int, int]:
    """(offset, length) of part `number` (from 1)."""
    if not 1 <= number <= parts_total(row):
        raise UploadInvalid(f"part {number}: this upload has parts 1 to {parts_total(row)}")
    offset = (number - 1) * row.part_bytes
    return offset, min(row.part_bytes, row.bytes - offset)


# --- create ------------------------------------------------------------------------------------


def _part_bytes(body: UploadCreate, settings: Settings) -> int:
    # At most MAX_UPLOAD_PARTS parts: a big file gets bigger parts by default.
    chosen = body.part_bytes or max(DEFAULT_PART_BYTES, math.ceil(body.bytes / MAX_UPLOAD_PARTS))
    lo, hi = settings.MIN_UPLOAD_PART_BYTES, settings.MAX_UPLOAD_PART_BYTES
    if not lo <= chosen <= hi and chosen < body.bytes:
        raise UploadInvalid(f"part_bytes: parts are {lo} to {hi} bytes (the last may be smaller)")
    if math.ceil(body.bytes / chosen) > MAX_UPLOAD_PARTS:
        raise UploadInvalid(
            f"part_bytes: {body.bytes} bytes would take over {MAX_UPLOAD_PARTS} parts"
        )
    return min(chosen, body.bytes)


def _check_name(body: UploadCreate) -> None:
    if body.kind == "dataset" and uploads.dataset_kind(body.filename) is None:
        raise UploadInvalid(
            f"filename: {body.filename}: expected a .npz file or an ImageFolder .zip / .tar.gz archive"
        )


def _check_open_uploads(session: Session, tenant_id: str, most: int) -> None:
    """Each open upload claims its whole size on the API's disk until it completes or
    expires: a tenant may hold only so many."""
    open_now = session.scalar(
        select(func.count())
        .select_from(UploadSession)
        .where(UploadSession.tenant_id == tenant_id, UploadSession.status != "completed")
    )
    if open_now >= most:
        raise UploadStateConflict(
            f"{open_now} unfinished uploads already (the limit is {most}); complete or abort "
            "one (DELETE /v1/uploads/{id}), or let it expire"
        )


def create(
    session: Session, *, tenant_id: str, body: UploadCreate, storage: Storage, settings: Settings
) -> UploadSession:
    """Open a resumable upload: 413 above MAX_RESUMABLE_UPLOAD_BYTES, 507 when the API's disk
    cannot hold the file (it is verified and inspected there), before any part is sent."""
    if body.bytes > settings.MAX_RESUMABLE_UPLOAD_BYTES:
        raise PayloadTooLarge(
            f"bytes: {body.bytes} is over the {settings.MAX_RESUMABLE_UPLOAD_BYTES} byte limit"
        )
    _check_name(body)
    part_bytes = _part_bytes(body, settings)
    _check_open_uploads(session, tenant_id, settings.MAX_OPEN_UPLOADS)
    ensure_disk(storage.tmp_dir(), body.bytes, settings.UPLOAD_DISK_RESERVE_BYTES)
    row = UploadSession(
        tenant_id=tenant_id,
        kind=body.kind,
        filename=body.filename,
        bytes=body.bytes,
        part_bytes=part_bytes,
        sha256=body.sha256.lower() if body.sha256 else None,
        fields=body.fields.model_dump(exclude_none=True),
        target_id=new_id("ds" if body.kind == "dataset" else "mdl"),
        status="open",
        expires_at=utcnow() + timedelta(hours=settings.UPLOAD_SESSION_TTL_HOURS),
    )
    session.add(row)
    session.flush()
    if storage.multipart:
        row.bucket_upload_id = storage.start_multipart(bucket_key(row))
    else:
        _allocate(storage, row)
    return row


def _allocate(storage: Storage, row: UploadSession) -> None:
    """The whole file, allocated now: the disk is claimed (or ENOSPC, a 507) before any part."""
    (_folder(storage, row.id) / "parts").mkdir(parents=True, exist_ok=True)
    with disk_full_is_507(), open(_data(storage, row.id), "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, row.bytes)
        except OSError as e:
            if e.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: a sparse file will do
                raise
            f.truncate(row.bytes)


# --- read --------------------------------------------------------------------------------------


def get(session: Session, *, tenant_id: str, upload_id: str, lock: bool = False) -> UploadSession:
    query = select(UploadSession).where(
        UploadSession.id == upload_id, UploadSession.tenant_id == tenant_id
    )
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise UploadNotFound(f"no upload {upload_id!r} (unfinished uploads expire)")
    return row


def received(row: UploadSession, storage: Storage) -> dict[int, int]:
    """Part number -> bytes, of the parts the store holds whole."""
    if row.status == "completed":
        return {}
    if storage.multipart:
        return {
            n: size for n, (size, _) in storage.parts(bucket_key(row), row.bucket_upload_id).items()
        }
    parts = _folder(storage, row.id) / "parts"
    if not parts.is_dir():
        return {}
    return {int(p.name): int(p.read_text() or 0) for p in parts.iterdir() if p.name.isdigit()}


def missing(row: UploadSession, have: dict[int, int]) -> list[int]:
    return [n for n in range(1, parts_total(row) + 1) if have.get(n) != part_span(row, n)[1]]


def describe(row: UploadSession, storage: Storage, settings: Settings) -> UploadPublic:
    have = received(row, storage)
    urls = None
    if storage.multipart and row.status == "open":
        urls = {
            n: storage.part_url(
                bucket_key(row), row.bucket_upload_id, n, expires=settings.PRESIGN_EXPIRY_SECONDS
            )
            for n in missing(row, have)[:URLS_PER_ANSWER]
        }
    return UploadPublic(
        id=row.id,
        kind=row.kind,
        filename=row.filename,
        bytes=row.bytes,
        part_bytes=row.part_bytes,
        parts_total=parts_total(row),
        sha256=row.sha256,
        status=row.status,
        parts=[UploadPartPublic(number=n, bytes=b) for n, b in sorted(have.items())],
        part_urls=urls,
        result_id=row.target_id if row.status == "completed" else None,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )


# --- parts (a local store) ---------------------------------------------------------------------


@dataclass(frozen=True)
class PartTarget:
    """Where the API writes part `number` of an open upload."""

    path: Path
    offset: int
    length: int


def part_target(row: UploadSession, number: int, storage: Storage) -> PartTarget:
    if storage.multipart:
        raise UploadStateConflict(
            "parts of this upload go straight to the bucket: PUT them to the part_urls that "
            f"GET /v1/uploads/{row.id} gives"
        )
    if row.status != "open":
        raise UploadStateConflict(f"upload {row.id} is {row.status}; it takes no more parts")
    offset, length = part_span(row, number)
    return PartTarget(_data(storage, row.id), offset, length)


def mark_part(row: UploadSession, number: int, length: int, storage: Storage) -> UploadPartPublic:
    """Record that part `number` arrived whole (written beside and renamed: a cut leaves no
    marker)."""
    marker = _folder(storage, row.id) / "parts" / str(number)
    tmp = marker.with_name(f".{number}.tmp")
    tmp.write_text(str(length))
    os.replace(tmp, marker)
    return UploadPartPublic(number=number, bytes=length)


# --- complete ----------------------------------------------------------------------------------


def begin_complete(
    session: Session, *, tenant_id: str, upload_id: str, storage: Storage
) -> UploadSession:
    """Claim the upload for completing once every part is there (a conditional UPDATE: of two
    `complete`s at once, the second gets a 409); one completed already is returned as it is."""
    row = get(session, tenant_id=tenant_id, upload_id=upload_id)
    if row.status == "completed":
        return row
    if row.status == "open":
        lacking = missing(row, received(row, storage))
        if lacking:
            shown = ", ".join(map(str, lacking[:20])) + (" …" if len(lacking) > 20 else "")
            raise UploadStateConflict(f"upload {row.id} lacks {len(lacking)} part(s): {shown}")
    claimed = session.execute(
        update(UploadSession)
        .where(UploadSession.id == row.id, UploadSession.status == "open")
        .values(status="completing")
    )
    if claimed.rowcount != 1:
        raise UploadStateConflict(f"upload {row.id} is being completed; GET it to see when")
    row.status = "completing"
    return row


def assemble(row: UploadSession, storage: Storage) -> Path:
    """The whole file on the API's disk: the local data file, or the bucket's parts
    assembled into the final object and read back once to be verified and inspected."""
    if not storage.multipart:
        return _data(storage, row.id)
    key = bucket_key(row)
    if storage.size(key) != row.bytes:  # not assembled yet (or by a completion cut short)
        etags = {n: etag for n, (_, etag) in storage.parts(key, row.bucket_upload_id).items()}
        storage.complete_multipart(key, row.bucket_upload_id, etags)
    local = _data(storage, row.id)
    local.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_is_507():
        storage.get_file(key, local)
    return local


def inspect(
    row: UploadSession, path: Path, storage: Storage, settings: Settings
) -> Dataset | UploadedModel:
    """Verify size and sha256, then inspect as POST /v1/datasets or /v1/models would."""
    if path.stat().st_size != row.bytes:
        raise UploadInvalid(f"the assembled file is {path.stat().st_size} bytes, not {row.bytes}")
    digest = sha256_file(path)
    if row.sha256 and digest != row.sha256:
        raise UploadInvalid(
            f"sha256 of the assembled file is {digest}, not the {row.sha256} declared; "
            "the upload was discarded: send it again"
        )
    if row.kind == "dataset":
        out = uploads.inspect_dataset(
            tmp_path=path, filename=row.filename, storage=storage, settings=settings, sha256=digest
        )
    else:
        out = uploads.inspect_model(
            tmp_path=path,
            filename=row.filename,
            fields=dict(row.fields),
            limits=settings.spec_limits(),
            sha256=digest,
        )
    out.id = row.target_id
    return out


def finish(
    session: Session,
    *,
    row: UploadSession,
    result: Dataset | UploadedModel,
    path: Path,
    storage: Storage,
) -> Dataset | UploadedModel:
    """Store the inspected dataset or model under its id and mark the upload completed (kept
    until it expires, so a `complete` whose answer was lost gets the same object again)."""
    stored = bucket_key(row) if storage.multipart else None
    uploads.store_upload(
        session, result, tenant_id=row.tenant_id, tmp_path=path, storage=storage, stored_key=stored
    )
    session.execute(
        update(UploadSession).where(UploadSession.id == row.id).values(status="completed")
    )
    return result


def reopen(database: Database, upload_id: str) -> None:
    """A completion that failed on the way (a store error): the parts are still there."""
    with database.session() as session:
        session.execute(
            update(UploadSession)
            .where(UploadSession.id == upload_id, UploadSession.status == "completing")
            .values(status="open")
        )


def result_of(session: Session, row: UploadSession) -> Dataset | UploadedModel:
    model = ROW_KINDS[row.kind]
    found = session.get(model, row.target_id)
    if found is None:  # completed, then deleted by its owner
        raise UploadNotFound(f"upload {row.id} was completed as {row.target_id}, since deleted")
    return found


def complete(
    database: Database, *, tenant_id: str, upload_id: str, storage: Storage, settings: Settings
) -> Dataset | UploadedModel:
    """Assemble, verify and inspect a whole upload, then store it: the same Dataset or
    UploadedModel as POST /v1/datasets or /v1/models. Sessions span the database work only
    (verifying and inspecting gigabytes holds none). A refused file (sha256, inspection) is
    discarded with its parts; a failure on the way (a store error) leaves the parts for a
    retry. Called again once completed: the same object."""
    with database.session() as session:
        row = begin_complete(session, tenant_id=tenant_id, upload_id=upload_id, storage=storage)
        if row.status == "completed":
            return result_of(session, row)
    try:
        path = assemble(row, storage)
        result = inspect(row, path, storage, settings)
    except UploadInvalid:
        discard(database, row, storage, object_too=True)
        raise
    except BaseException:
        reopen(database, row.id)
        raise
    try:
        with database.session() as session:
            finish(session, row=row, result=result, path=path, storage=storage)
    except BaseException:
        reopen(database, row.id)
        raise
    shutil.rmtree(_folder(storage, row.id), ignore_errors=True)
    return result


# --- abort and expire --------------------------------------------------------------------------


def remove_parts(row: UploadSession, storage: Storage, *, object_too: bool = False) -> None:
    """Drop what an unfinished upload holds: its local folder, its bucket parts (and, for an
    upload refused at completion, the object the bucket had assembled)."""
    shutil.rmtree(_folder(storage, row.id), ignore_errors=True)
    if storage.multipart and row.bucket_upload_id:
        storage.abort_multipart(bucket_key(row), row.bucket_upload_id)
        if object_too:
            storage.delete_prefix(bucket_key(row).rsplit("/", 1)[0])


def discard(
    database: Database, row: UploadSession, storage: Storage, *, object_too: bool = False
) -> None:
    """An upload refused at completion (checksum, inspection): parts and row go."""
    try:
        remove_parts(row, storage, object_too=object_too)
    except StorageError as e:
        log.warning("could not remove the parts of %s: %s", row.id, e)
    with database.session() as session:
        session.execute(delete(UploadSession).where(UploadSession.id == row.id))


def abort(session: Session, *, tenant_id: str, upload_id: str, storage: Storage) -> None:
    row = get(session, tenant_id=tenant_id, upload_id=upload_id, lock=True)
    if row.status == "completing":
        raise UploadStateConflict(f"upload {row.id} is being completed")
    if row.status == "open":
        remove_parts(row, storage)
    session.delete(row)


def expire(database: Database, storage: Storage, *, limit: int = 200) -> int:
    """Remove uploads past their expiry (parts first, then the row: a store that fails keeps
    the row for the next pass). Completed ones only lose their row."""
    with database.session() as session:
        rows = list(
            session.scalars(
                select(UploadSession)
                .where(UploadSession.expires_at < utcnow())
                .order_by(UploadSession.expires_at)
                .limit(limit)
            )
        )
    done = 0
    for row in rows:
        try:
            if row.status != "completed":
                remove_parts(row, storage)
        except StorageError as e:
            log.warning("could not expire upload %s: %s", row.id, e)
            continue
        with database.session() as session:
            session.execute(delete(UploadSession).where(UploadSession.id == row.id))
        done += 1
    return done


class ExpireUploads:
    """The reaper's chore (app/jobs/reaper.py) for unfinished uploads past their expiry."""

    def __init__(self, database: Database, storage: Storage) -> None:
        self.database, self.storage = database, storage

    def __repr__(self) -> str:
        return "ExpireUploads()"

    def __call__(self) -> dict[str, int]:
        done = expire(self.database, self.storage)
        return {"expired_upload_sessions": done} if done else {}
