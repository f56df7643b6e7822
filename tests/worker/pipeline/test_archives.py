"""safe_extract: user archives unpack into dest and never anywhere else.

Every hostile archive here is built so that a naive extractor *would* write outside dest;
each test checks that path stays absent, not only that an error was raised.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from worker.pipeline.archives import safe_extract
from worker.pipeline.errors import DatasetError

FILES = {"cats/a.txt": b"meow", "cats/deep/b.txt": b"purr" * 100, "dogs/c.txt": b"woof"}


def _zip(path: Path, members: dict[str, bytes], *, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if data else None)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            _tar_add(tf, name, data)
    return path


def _build(path: Path, members: dict[str, bytes]) -> Path:
    return _zip(path, members) if path.name.endswith(".zip") else _tar(path, members)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _nothing_left(dest: Path) -> bool:
    """A refused archive leaves no partial extraction behind."""
    return not dest.exists() or not any(dest.iterdir())


# --- archives that should unpack -----------------------------------------------------------


@pytest.mark.parametrize("name", ["data.zip", "data.tar.gz"])
def test_a_normal_archive_extracts_every_file_with_its_content(tmp_path, name):
    archive = _build(tmp_path / name, FILES)

    out = safe_extract(archive, tmp_path / "out")

    assert out == tmp_path / "out"
    assert _tree(out) == FILES


@pytest.mark.parametrize("build", [_zip, _tar], ids=["zip", "tar.gz"])
def test_an_upload_without_an_archive_extension_is_recognised_by_content(tmp_path, build):
    archive = build(tmp_path / "upload.bin", FILES)

    assert _tree(safe_extract(archive, tmp_path / "out")) == FILES


# --- traversal and links -------------------------------------------------------------------


def test_zip_member_with_dotdot_is_refused_and_nothing_lands_outside(tmp_path):
    dest = tmp_path / "a" / "dest"
    archive = _zip(tmp_path / "evil.zip", {"ok.txt": b"fine", "../evil.txt": b"pwned"})

    with pytest.raises(DatasetError, match=r"outside the archive"):
        safe_extract(archive, dest)

    assert not (tmp_path / "a" / "evil.txt").exists()
    assert _nothing_left(dest)


def test_zip_member_with_absolute_path_is_refused_and_nothing_lands_there(tmp_path):
    target = tmp_path / "abs_target.txt"
    archive = _zip(tmp_path / "evil.zip", {str(target): b"pwned"})

    with pytest.raises(DatasetError, match=r"absolute path"):
        safe_extract(archive, tmp_path / "dest")

    assert not target.exists()


def test_tar_member_with_dotdot_is_refused_and_nothing_lands_outside(tmp_path):
    dest = tmp_path / "a" / "dest"
    archive = _tar(tmp_path / "evil.tar.gz", {"ok.txt": b"fine", "../evil": b"pwned"})

    with pytest.raises(DatasetError, match=r"outside the archive"):
        safe_extract(archive, dest)

    assert not (tmp_path / "a" / "evil").exists()
    assert _nothing_left(dest)


def test_tar_member_with_absolute_path_is_refused_and_nothing_lands_there(tmp_path):
    target = tmp_path / "abs_target.txt"
    archive = _tar(tmp_path / "evil.tar.gz", {str(target): b"pwned"})

    with pytest.raises(DatasetError, match=r"absolute path"):
        safe_extract(archive, tmp_path / "dest")

    assert not target.exists()


def test_tar_symlink_member_is_refused_so_a_later_file_cannot_write_through_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        _tar_add(tf, "escape", type=tarfile.SYMTYPE, linkname=str(outside))
        _tar_add(tf, "escape/evil.txt", b"pwned")

    with pytest.raises(DatasetError, match=r"link"):
        safe_extract(archive, tmp_path / "dest")

    assert not (outside / "evil.txt").exists()
    assert not (tmp_path / "dest" / "escape").is_symlink()


def test_tar_hardlink_member_is_refused_so_an_outside_file_is_not_overwritten(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"original")
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        _tar_add(tf, "h", type=tarfile.LNKTYPE, linkname=str(secret))
        _tar_add(tf, "h", b"pwned")

    with pytest.raises(DatasetError, match=r"link"):
        safe_extract(archive, tmp_path / "dest")

    assert secret.read_bytes() == b"original"
    assert not (tmp_path / "dest" / "h").exists()


def test_zip_symlink_member_is_refused(tmp_path):
    outside = tmp_path / "outside"
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, str(outside))

    with pytest.raises(DatasetError, match=r"symbolic link"):
        safe_extract(archive, tmp_path / "dest")

    assert not (tmp_path / "dest" / "link").exists()
    assert not (tmp_path / "dest" / "link").is_symlink()


@pytest.mark.parametrize(
    "kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE], ids=["fifo", "chr", "blk"]
)
def test_tar_device_or_fifo_member_is_refused(tmp_path, kind):
    archive = tmp_path / "dev.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        _tar_add(tf, "dev", type=kind, devmajor=1, devminor=3)

    with pytest.raises(DatasetError, match=r"not a regular file"):
        safe_extract(archive, tmp_path / "dest")

    assert not os.path.lexists(tmp_path / "dest" / "dev")


# --- caps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["many.zip", "many.tar.gz"])
def test_an_archive_with_more_members_than_the_cap_is_refused(tmp_path, name):
    archive = _build(tmp_path / name, {f"f{i}.txt": b"x" for i in range(5)})

    with pytest.raises(DatasetError, match=r"members"):
        safe_extract(archive, tmp_path / "dest", max_members=3)

    assert _nothing_left(tmp_path / "dest")


@pytest.mark.parametrize("name", ["big.zip", "big.tar.gz"])
def test_an_archive_declaring_more_bytes_than_the_cap_is_refused(tmp_path, name):
    archive = _build(tmp_path / name, {"a.bin": b"\0" * 600, "b.bin": b"\0" * 600})

    with pytest.raises(DatasetError, match=r"cap"):
        safe_extract(archive, tmp_path / "dest", max_total_bytes=1000)

    assert _nothing_left(tmp_path / "dest")


def test_a_highly_compressible_member_over_the_byte_cap_is_refused(tmp_path):
    # 5 MB of zeros compresses to a few KB: the upload looks tiny, the expansion is not.
    archive = _zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * (5 << 20)})
    assert archive.stat().st_size < 64 << 10

    with pytest.raises(DatasetError, match=r"cap"):
        safe_extract(archive, tmp_path / "dest", max_total_bytes=1 << 20)

    assert _nothing_left(tmp_path / "dest")


def _lie_about_size(archive: Path, real: int, claimed: int) -> None:
    """Patch both the local header and the central directory to claim `claimed` bytes."""
    raw = bytearray(archive.read_bytes())
    local = raw.find(b"PK\x03\x04")
    central = raw.find(b"PK\x01\x02")
    # Uncompressed-size field: offset 22 in a local header, 24 in a central directory entry.
    for offset in (local + 22, central + 24):
        assert struct.unpack_from("<I", raw, offset)[0] == real
        struct.pack_into("<I", raw, offset, claimed)
    archive.write_bytes(bytes(raw))


def test_a_zip_bomb_whose_header_lies_about_its_size_is_stopped_without_filling_the_disk(
    tmp_path,
):
    real, claimed, cap = 5 << 20, 100, 1 << 20
    archive = _zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * real})
    _lie_about_size(archive, real, claimed)
    with zipfile.ZipFile(archive) as zf:  # the lie is what a reader sees up front
        assert zf.getinfo("zeros.bin").file_size == claimed
    dest = tmp_path / "dest"

    with pytest.raises(DatasetError):
        safe_extract(archive, dest, max_total_bytes=cap)

    written = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) if dest.exists() else 0
    assert written <= cap


# --- broken input --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data.zip", "data.tar.gz"])
def test_a_truncated_archive_is_reported_as_corrupt(tmp_path, name):
    # Random bytes do not compress, so the cut lands inside the member data.
    full = _build(tmp_path / f"full-{name}", {"a.bin": os.urandom(64 << 10)}).read_bytes()
    archive = tmp_path / name
    archive.write_bytes(full[: len(full) // 2])

    with pytest.raises(DatasetError, match=r"corrupt or truncated"):
        safe_extract(archive, tmp_path / "dest")

    assert _nothing_left(tmp_path / "dest")


def test_a_file_that_is_not_an_archive_is_refused_by_name(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("just some text, not an archive\n" * 20)

    with pytest.raises(DatasetError, match=r"not a \.zip or \.tar\.gz archive"):
        safe_extract(notes, tmp_path / "dest")


def test_random_bytes_named_zip_are_reported_as_corrupt(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_bytes(os.urandom(4096))

    with pytest.raises(DatasetError, match=r"fake\.zip"):
        safe_extract(fake, tmp_path / "dest")


def _patch_zip_headers(archive: Path, *, flags: int = 0, method: int | None = None) -> None:
    """Set general-purpose flag bits and/or the compression method in both zip headers."""
    raw = bytearray(archive.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    for flag_at, method_at in ((local + 6, local + 8), (central + 8, central + 10)):
        struct.pack_into("<H", raw, flag_at, struct.unpack_from("<H", raw, flag_at)[0] | flags)
        if method is not None:
            struct.pack_into("<H", raw, method_at, method)
    archive.write_bytes(bytes(raw))


def test_a_password_protected_zip_is_refused_as_a_dataset_error(tmp_path):
    archive = _zip(tmp_path / "locked.zip", {"cats/a.txt": b"meow" * 100})
    _patch_zip_headers(archive, flags=0x1)  # bit 0: the member is encrypted

    with pytest.raises(DatasetError, match=r"locked\.zip"):
        safe_extract(archive, tmp_path / "dest")

    assert _nothing_left(tmp_path / "dest")


def test_a_zip_with_an_unsupported_compression_method_is_refused_as_a_dataset_error(tmp_path):
    archive = _zip(tmp_path / "d64.zip", {"cats/a.txt": b"meow" * 100})
    _patch_zip_headers(archive, method=9)  # 9 = Deflate64, which zipfile cannot read

    with pytest.raises(DatasetError, match=r"d64\.zip"):
        safe_extract(archive, tmp_path / "dest")

    assert _nothing_left(tmp_path / "dest")


# --- bombs, refused from their headers ------------------------------------------------------


def _tar_gz_of_zeros(path: Path, members: int, each: int) -> Path:
    zeros = b"\0" * each
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        for i in range(members):
            _tar_add(tf, f"cls/{i}.png", zeros)
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_absurd_compression_ratio_is_refused_before_a_byte_is_written(
    tmp_path, monkeypatch, kind
):
    """~100 KB expanding to 96 MiB (about 1000x): refused from the zip's central directory,
    or from a tar's headers read in a streamed pass that stops at the cap."""
    import worker.pipeline.archives as archives

    if kind == "zip":
        archive = _zip(tmp_path / "bomb.zip", {"cls/zeros.png": b"\0" * (96 << 20)})
    else:
        archive = _tar_gz_of_zeros(tmp_path / "bomb.tar.gz", members=12, each=8 << 20)
    assert archive.stat().st_size < 1 << 20
    written: list[str] = []
    monkeypatch.setattr(archives, "_copy_capped", lambda *a: written.append(a[3]) or 0)

    with pytest.raises(DatasetError, match=r"archive bomb"):
        safe_extract(archive, tmp_path / "dest")

    assert written == [] and not (tmp_path / "dest").exists()


def test_a_modest_ratio_and_a_small_archive_of_zeros_pass_the_bomb_check(tmp_path):
    from worker.pipeline.archives import check_expansion

    small = _zip(tmp_path / "small.zip", {"zeros.bin": b"\0" * (5 << 20)})  # 1000x, 5 MiB
    assert check_expansion(small) == 5 << 20
    noisy = _zip(tmp_path / "noisy.zip", {"a.bin": os.urandom(1 << 20)})
    assert check_expansion(noisy, max_ratio=1.5) == 1 << 20
