"""Room on the API's disk for uploads: refused (507) before writing, not after filling it."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.core.errors import InsufficientStorage


def ensure_disk(folder: Path, needed: int, reserve: int) -> None:
    """507 unless `folder`'s disk holds `needed` more bytes with `reserve` to spare."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed + reserve > free:
        raise InsufficientStorage(
            f"the server's disk cannot hold {needed} bytes now ({max(free - reserve, 0)} "
            "available for uploads); retry later or ask the operator for room"
        )


@contextmanager
def disk_full_is_507() -> Iterator[None]:
    """A disk that fills while writing an upload is the same 507, not a 500."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage(
                "the server's disk filled up while writing the upload"
            ) from None
        raise
