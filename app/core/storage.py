"""Where uploads, checkpoints and artifacts live: a local folder, or an S3-compatible bucket.

`STORAGE_URL` chooses (`open_storage`). Both stores speak in keys, the POSIX paths the
database records (`jobs/<id>/model.onnx`, `uploads/<tenant>/datasets/<id>/<file>`). A local
folder is *shared*: API and workers on one host (or over NFS) read and write its files in
place. A bucket is not: a worker works in a folder of its own and copies to and from the
bucket (worker/jobfolder.py), and the API streams uploads into it and hands out presigned URLs.
Every write is whole or absent: a local file is written beside its place and renamed, and S3
shows an object (multipart included) only once its upload completes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from app.core.db import after_commit

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.core.config import Settings

log = logging.getLogger("distillery.storage")

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
CHUNK = 1024 * 1024
_ABSENT = ("404", "NoSuchKey", "NotFound")


def safe_filename(name: str, default: str = "upload") -> str:
    """A client-supplied file name reduced to one harmless path component."""
    base = Path(name.replace("\\", "/")).name
    base = _SAFE.sub("_", base).strip("._")
    return base[:120] or default


def job_key(job_id: str, name: str = "") -> str:
    return f"jobs/{job_id}/{name}" if name else f"jobs/{job_id}"


def upload_key(tenant_id: str, kind: str, upload_id: str, filename: str = "") -> str:
    folder = f"uploads/{tenant_id}/{kind}/{upload_id}"
    return f"{folder}/{filename}" if filename else folder


class StorageError(Exception):
    """The store did not answer, or refused: the operation did not happen."""


class Storage:
    """What API and workers need of a store. Keys are relative POSIX paths."""

    shared = False  # True: a folder that every process reads and writes in place
    multipart = False  # True: clients send a resumable upload's parts to the store itself

    def ensure(self) -> None: ...
    def writable(self) -> bool: ...
    def tmp_dir(self) -> Path: ...
    def put_file(self, key: str, src: Path, *, move: bool = False) -> None: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def size(self, key: str) -> int | None: ...
    def list(self, prefix: str) -> dict[str, int]: ...  # key -> bytes, under prefix/
    def delete_prefix(self, prefix: str) -> None: ...
    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...

    def local_path(self, key: str) -> Path | None:
        """The key's file, where the store is a folder this process sees."""
        return None

    def presigned_url(
        self, key: str, *, filename: str, expires: int, content_type: str | None = None
    ) -> str | None:
        """A time-limited URL a client downloads the object from, where the store has one;
        its answer carries `content_type` when given."""
        return None


class LocalStorage(Storage):
    shared = True

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def ensure(self) -> None:
        for sub in ("jobs", "uploads", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def writable(self) -> bool:
        probe = self.root / "tmp" / ".probe"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False

    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def local_path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):  # keys are ours, but check anyway
            raise ValueError(f"key {key!r} escapes the storage root")
        return path

    def put_file(self, key: str, src: Path, *, move: bool = False) -> None:
        dest = self.local_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(src, dest)
        else:
            _atomic_copy(src, dest)

    def get_file(self, key: str, dest: Path) -> None:
        _atomic_copy(self.local_path(key), dest)

    def size(self, key: str) -> int | None:
        path = self.local_path(key)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str) -> dict[str, int]:
        base = self.local_path(prefix)
        if not base.is_dir():
            return {}
        return {
            str(p.relative_to(self.root)): p.stat().st_size
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".part-")
        }

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.local_path(prefix), ignore_errors=True)

    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with open(self.local_path(key), "rb") as f:
            f.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = f.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                left = None if left is None else left - len(chunk)
                yield chunk


def _atomic_copy(src: Path, dest: Path) -> None:
    """`src` copied beside `dest`, then renamed: whole or absent."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".part-", delete=False) as f,
        open(src, "rb") as s,
    ):
        shutil.copyfileobj(s, f, CHUNK)
    os.replace(f.name, dest)


class S3Storage(Storage):
    """A bucket (and prefix) on AWS S3 or any S3-compatible store, through boto3. Endpoint,
    region and credentials come from the settings, else from the standard AWS environment
    (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`)."""

    multipart = True

    def __init__(self, url: str, settings: Settings) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parsed = urlparse(url)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.tmp = settings.home / "tmp"
        endpoint = settings.S3_ENDPOINT_URL or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(
            connect_timeout=settings.S3_CONNECT_TIMEOUT_SECONDS,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            # MinIO, moto and most self-hosted stores want path-style addressing.
            s3={"addressing_style": "path" if endpoint else "auto"},
            signature_version="s3v4",
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=settings.S3_REGION or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            aws_access_key_id=settings.S3_ACCESS_KEY_ID,
            aws_secret_access_key=settings.S3_SECRET_ACCESS_KEY,
            config=config,
        )
        # Objects above the threshold go up in parts (and in parallel); a failed multipart
        # upload is aborted by boto3 and never becomes a visible object.
        self.transfer = TransferConfig(
            multipart_threshold=settings.S3_MULTIPART_BYTES,
            multipart_chunksize=settings.S3_MULTIPART_BYTES,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            raise StorageError(f"the store refused to {what}: {err.get('Code')}") from e
        except (BotoCoreError, OSError) as e:
            raise StorageError(f"the store is unreachable ({what}): {type(e).__name__}") from e

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def writable(self) -> bool:
        try:
            self._call(
                "write",
                self.client.put_object,
                Bucket=self.bucket,
                Key=self._key("tmp/.probe"),
                Body=b"ok",
            )
            return True
        except StorageError:
            return False

    def tmp_dir(self) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def put_file(self, key: str, src: Path, *, move: bool = False) -> None:
        self._call(
            "store a file",
            self.client.upload_file,
            str(src),
            self.bucket,
            self._key(key),
            Config=self.transfer,
        )
        if move:
            Path(src).unlink(missing_ok=True)

    def get_file(self, key: str, dest: Path) -> None:
        # Downloaded beside its place and renamed: a reader never sees half a file.
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        os.close(fd)
        try:
            self._call(
                "read a file",
                self.client.download_file,
                self.bucket,
                self._key(key),
                part,
                Config=self.transfer,
            )
            os.replace(part, dest)
        finally:
            Path(part).unlink(missing_ok=True)

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self._call(
                "read a file", self.client.head_object, Bucket=self.bucket, Key=self._key(key)
            )
        except StorageError as e:
            cause = e.__cause__
            if isinstance(cause, ClientError) and cause.response["Error"].get("Code") in _ABSENT:
                return None
            raise
        return int(head["ContentLength"])

    def list(self, prefix: str) -> dict[str, int]:
        full = self._key(prefix.rstrip("/")) + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full
        )
        strip = len(self.prefix) + 1 if self.prefix else 0
        found: dict[str, int] = {}
        for page in self._call("list files", list, pages):
            for obj in page.get("Contents", []):
                found[obj["Key"][strip:]] = int(obj["Size"])
        return found

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list(prefix)]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys at most
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            self._call("delete files", self.client.delete_objects, Bucket=self.bucket, Delete=batch)

    def stream(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        span = f"bytes={start}-{'' if end is None else end}"
        reply = self._call(
            "read a file",
            self.client.get_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Range=span,
        )
        return reply["Body"].iter_chunks(CHUNK)

    def presigned_url(
        self, key: str, *, filename: str, expires: int, content_type: str | None = None
    ) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        if content_type is not None:  # the object was stored without one
            params["ResponseContentType"] = content_type
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)

    # -- a multipart upload whose parts the client sends straight to the bucket ------------

    def start_multipart(self, key: str) -> str:
        """Begin an S3 multipart upload of `key`; returns its UploadId."""
        reply = self._call(
            "start an upload",
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=self._key(key),
        )
        return reply["UploadId"]

    def part_url(self, key: str, upload_id: str, number: int, *, expires: int) -> str:
        """A presigned URL the client PUTs part `number` to, without credentials."""
        params = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "UploadId": upload_id,
            "PartNumber": number,
        }
        return self.client.generate_presigned_url("upload_part", Params=params, ExpiresIn=expires)

    def parts(self, key: str, upload_id: str) -> dict[int, tuple[int, str]]:
        """The parts the bucket holds: number -> (bytes, ETag)."""
        pages = self.client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
        )
        return {
            int(p["PartNumber"]): (int(p["Size"]), p["ETag"])
            for page in self._call("list the parts of an upload", list, pages)
            for p in page.get("Parts", [])
        }

    def complete_multipart(self, key: str, upload_id: str, etags: dict[int, str]) -> None:
        parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
        self._call(
            "assemble an upload",
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=self._key(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an unfinished upload's parts (an upload already gone is not an error)."""
        from botocore.exceptions import ClientError

        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
            )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise StorageError(f"the store refused to abort an upload: {e}") from e


def remove_after_commit(session: Session, storage: Storage, prefixes: list[str]) -> None:
    """Delete the files under `prefixes` once the rows that name them are gone for good."""

    def remove() -> None:
        for prefix in prefixes:
            try:
                storage.delete_prefix(prefix)
            except StorageError as e:  # the rows are gone; the files wait for an operator
                log.warning("could not delete %s from the store: %s", prefix, e)

    after_commit(session, remove)


def open_storage(settings: Settings) -> Storage:
    """The store `STORAGE_URL` names: `s3://bucket/prefix`, or a folder (a path or a
    `file://` URL; unset: `STORAGE_DIR`, whose default is DISTILLERY_HOME/storage)."""
    url = settings.STORAGE_URL
    if url and url.startswith("s3://"):
        if not urlparse(url).netloc:
            raise ValueError("STORAGE_URL s3://… names no bucket")
        return S3Storage(url, settings)
    if url:
        return LocalStorage(Path(url.removeprefix("file://")))
    return LocalStorage(settings.storage_dir)
