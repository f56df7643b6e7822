"""Traversal-safe extraction of user archives (.zip, .tar.gz) with caps on entries and bytes."""

from __future__ import annotations

import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from worker.pipeline.errors import DatasetError

MAX_MEMBERS = 200_000
MAX_TOTAL_BYTES = 4 * 1024**3
# Expanding more than this many times the archive's own size is a bomb (photos in a zip are
# ~1x, raw arrays ~10x; a 2 MB zip of 2 GiB of zeros is 1000x) once past RATIO_FLOOR: small
# archives of zeros are harmless whatever their ratio.
MAX_RATIO = 100.0
RATIO_FLOOR = 64 * 1024**2
_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    RuntimeError,
    NotImplementedError,
    zlib.error,
    lzma.LZMAError,
)


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DatasetError(f"archive member {name!r} has an absolute path")
    if ".." in path.parts:
        raise DatasetError(f"archive member {name!r} points outside the archive (..)")
    return path


def archive_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    # Fall back to content sniffing: uploads may arrive under a neutral name.
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise DatasetError(f"{path.name}: not a .zip or .tar.gz archive")


def _kind(archive: Path, name: str) -> str:
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    return archive_kind(archive)


def check_expansion(
    archive: Path,
    *,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
    name: str | None = None,
) -> int:
    """The bytes `archive` expands to, or DatasetError for a bomb: more than `max_total_bytes`,
    or more than `max_ratio` times its own size past RATIO_FLOOR. Nothing is written: a zip's
    central directory declares its sizes; a tar's headers are read in one streamed pass (a
    .tar.gz decompressed and dropped) that stops at the cap. `name`: the uploader's name of
    the file, for its suffix and the messages."""
    name = name or archive.name
    size = archive.stat().st_size
    cap = min(max_total_bytes, max(RATIO_FLOOR, int(size * max_ratio)))
    try:
        kind = _kind(archive, name)
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                total = sum(i.file_size for i in zf.infolist())
        else:
            total = 0
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    total += member.size
                    if total > cap:
                        break
    except (*_ARCHIVE_ERRORS, OSError) as e:
        raise DatasetError(f"{name}: corrupt or truncated archive ({e})") from None
    if total > max_total_bytes:
        # A zip declares its total; a tar's count stopped at the cap.
        raise DatasetError(
            f"{name}: archive expands to {total} bytes; the cap is {max_total_bytes}"
            if kind == "zip"
            else f"{name}: archive expands past the {max_total_bytes} byte cap"
        )
    if total > cap:
        raise DatasetError(
            f"{name}: a {size}-byte archive expanding to {total} bytes or more "
            f"({total / max(size, 1):.0f}x) is refused as an archive bomb; the limit is "
            f"{max_ratio:g}x its size past {RATIO_FLOOR >> 20} MiB"
        )
    return total


def safe_extract(
    archive: Path,
    dest: Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
) -> Path:
    """Extract `archive` into `dest`, refusing traversal, links, devices and oversized content.

    Sizes are checked against the headers first (`check_expansion`: a bomb is refused before
    a byte is written) and again while writing, so a member that lies about its size is
    stopped at the cap rather than after filling the disk.
    `dest` must be new or empty: on failure it is removed with whatever was extracted.
    """
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"extraction target {dest} is not empty")
    kind = archive_kind(archive)
    check_expansion(archive, max_total_bytes=max_total_bytes, max_ratio=max_ratio)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "zip":
            _extract_zip(archive, dest, max_members, max_total_bytes)
        else:
            _extract_tar(archive, dest, max_members, max_total_bytes)
    except DatasetError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError(_os_error_message(archive, dest, e)) from None
    except _ARCHIVE_ERRORS as e:
        # RuntimeError: an encrypted member; NotImplementedError: e.g. Deflate64 compression;
        # zlib/lzma errors: a compressed member whose data is damaged (zipfile lets them through).
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError(f"{archive.name}: corrupt or truncated archive ({e})") from None
    return dest


def _os_error_message(archive: Path, dest: Path, e: OSError) -> str:
    """What failed, in the archive's terms. The OS names the file it failed on, a path on this
    machine (a member name too long, a file where the archive also has a folder, a full disk):
    name the member instead."""
    if e.filename is None:  # gzip's BadGzipFile and the like: the archive's bytes are wrong
        return f"{archive.name}: corrupt or truncated archive ({e})"
    target = Path(os.fsdecode(e.filename))
    if target.is_relative_to(dest):
        member = target.relative_to(dest).as_posix()
        return f"{archive.name}: cannot extract member {member!r} ({e.strerror})"
    return f"{archive.name}: cannot read the archive ({e.strerror})"


def _copy_capped(src, dst_path: Path, budget: int, name: str) -> int:
    written = 0
    with open(dst_path, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise DatasetError(f"archive expands past its byte cap at member {name!r}")
            out.write(chunk)
    return written


def _extract_zip(archive: Path, dest: Path, max_members: int, max_total: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise DatasetError(f"archive has {len(infos)} members; the cap is {max_members}")
        declared = sum(i.file_size for i in infos)
        if declared > max_total:
            raise DatasetError(f"archive expands to {declared} bytes; the cap is {max_total}")
        used = 0
        for info in infos:
            rel = _safe_name(info.filename)
            if info.flag_bits & 0x1:
                raise DatasetError(
                    f"{archive.name}: member {info.filename!r} is encrypted; password-protected archives are not supported"
                )
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DatasetError(f"archive member {info.filename!r} is a symbolic link")
            target = dest.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                used += _copy_capped(src, target, max_total - used, info.filename)


def _extract_tar(archive: Path, dest: Path, max_members: int, max_total: int) -> None:
    with tarfile.open(archive, "r:*") as tf:
        used, count = 0, 0
        for member in tf:
            count += 1
            if count > max_members:
                raise DatasetError(f"archive has more than {max_members} members")
            rel = _safe_name(member.name)
            if member.issym() or member.islnk():
                raise DatasetError(f"archive member {member.name!r} is a link")
            if not (member.isfile() or member.isdir()):
                raise DatasetError(f"archive member {member.name!r} is not a regular file")
            target = dest.joinpath(*rel.parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if used + member.size > max_total:
                raise DatasetError(f"archive expands past the {max_total} byte cap")
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(member)
            if src is None:
                raise DatasetError(f"archive member {member.name!r} cannot be read")
            with src:
                used += _copy_capped(src, target, max_total - used, member.name)
