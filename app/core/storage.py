"""Artifacts, uploads and job working folders on a filesystem shared by API and workers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "upload") -> str:
    """A client-supplied file name reduced to one harmless path component."""
    base = Path(name.replace("\\", "/")).name
    base = _SAFE.sub("_", base).strip("._")
    return base[:120] or default


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def ensure(self) -> None:
        for sub in ("jobs", "uploads", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def upload_dir(self, tenant_id: str, kind: str, upload_id: str) -> Path:
        return self.root / "uploads" / tenant_id / kind / upload_id

    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root))

    def resolve(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):  # stored paths are ours, but check anyway
            raise ValueError(f"path {rel!r} escapes the storage root")
        return path

    def remove(self, rel: str) -> None:
        shutil.rmtree(self.resolve(rel), ignore_errors=True)

    def writable(self) -> bool:
        probe = self.root / "tmp" / ".probe"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False
