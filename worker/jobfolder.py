"""A job's folder on the worker that runs it, kept in step with the store.

The pipeline reads and writes a local folder (`out`), nothing else. On a shared folder store
that folder *is* the job's place in the store and every method here does nothing. On a
bucket the folder is the worker's own (under WORK_DIR): `pull` brings what an earlier attempt
left (checkpoints, a search's teacher), `push` sends new and changed work files up (at each
stage's end, and at most every CHECKPOINT_SYNC_SECONDS in between), `publish` sends the
artifacts before the job is recorded as succeeded. A job resumed on another host therefore
continues from the last pushed checkpoint. The store's errors (StorageError) fail the job
with `storage_error`; it is never recorded as succeeded with artifacts the store lacks.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from app.core.storage import Storage, StorageError, job_key
from distillery_contract.states import StageStatus
from worker.pipeline.files import sha256_file

EventFn = Callable[[dict[str, Any]], None]


def _scratch(rel: Path) -> bool:
    """Half-written files, and archives extracted for one run (`.work/tmp…`)."""
    return rel.name.startswith(".part-") or (len(rel.parts) > 2 and rel.parts[1].startswith("tmp"))


class JobFolder:
    """`key`: the job's place in the store (`jobs/<id>`); `path`: where it is on this worker."""

    def __init__(self, storage: Storage, key: str, path: Path, *, sync_every: float) -> None:
        self.storage, self.key, self.path = storage, key, path
        self.synced = not storage.shared
        self.sync_every = sync_every
        self._pushed: dict[str, tuple[int, int]] = {}
        self._last_push = time.monotonic()

    def pull(self, under: str = "", *, skip: tuple[str, ...] = ()) -> None:
        """Copy the stored files under `under` (all but those under `skip`) down."""
        if not self.synced:
            return
        prefix = f"{self.key}/{under}".rstrip("/")
        for key in self.storage.list(prefix):
            rel = key[len(self.key) + 1 :]
            if skip and rel.startswith(skip):
                continue
            self.storage.get_file(key, self.path / rel)
            self._mark(rel)

    def push(self, under: str = ".work") -> None:
        """Send the files under `under` that are new or changed since the last push."""
        self._last_push = time.monotonic()
        base = self.path / under
        if not self.synced or not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(self.path)
            if not path.is_file() or _scratch(rel):
                continue
            stat = path.stat()
            if self._pushed.get(rel.as_posix()) != (stat.st_size, stat.st_mtime_ns):
                self.storage.put_file(f"{self.key}/{rel.as_posix()}", path)
                self._pushed[rel.as_posix()] = (stat.st_size, stat.st_mtime_ns)

    def publish(self, names: Iterable[str]) -> None:
        """Send the job's artifacts (files directly in the folder) up, every one."""
        if self.synced:
            for name in names:
                self.storage.put_file(f"{self.key}/{name}", self.path / name)

    def watching(self, on_event: EventFn, under: str = ".work") -> EventFn:
        """`on_event`, then a push when a stage ended or the last push is old enough."""

        def handle(e: dict[str, Any]) -> None:
            on_event(e)
            stage_ended = e.get("type") == "stage" and e.get("status") == StageStatus.SUCCEEDED
            if stage_ended or time.monotonic() - self._last_push >= self.sync_every:
                self.push(under)

        return handle if self.synced else on_event

    def discard(self) -> None:
        """Forget the worker's copy once the job has ended (the store keeps what matters)."""
        if self.synced:
            shutil.rmtree(self.path, ignore_errors=True)

    def _mark(self, rel: str) -> None:
        stat = (self.path / rel).stat()
        self._pushed[rel] = (stat.st_size, stat.st_mtime_ns)


def job_folder(
    storage: Storage, work_dir: Path, job_id: str, *, sync_every: float, at: str | None = None
) -> JobFolder:
    """Job `job_id`'s folder. `at`: the worker's copy of it goes in a folder of that name
    (a search's branches each keep their own copy of the search's folder)."""
    key = job_key(job_id)
    if storage.shared:
        return JobFolder(storage, key, storage.local_path(key), sync_every=sync_every)
    path = work_dir / "jobs" / (at or job_id)
    shutil.rmtree(path, ignore_errors=True)  # the store is the truth; an old copy may be stale
    return JobFolder(storage, key, path, sync_every=sync_every)


def local_input(storage: Storage, work_dir: Path, key: str, sha256: str) -> Path:
    """An uploaded file on this worker: the store's own file on a shared folder, else a copy
    in the worker's cache, named by content and checked against the sha256 recorded at
    upload (a copy is made once per worker and kept)."""
    if storage.shared:
        return storage.local_path(key)
    path = work_dir / "inputs" / sha256 / key.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    # A name of its own: two workers on one host may fetch the same input at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    os.close(fd)
    part = Path(name)
    try:
        storage.get_file(key, part)
        if sha256_file(part) != sha256:
            raise StorageError(f"the stored {path.name} does not match its sha256")
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)
    return path
