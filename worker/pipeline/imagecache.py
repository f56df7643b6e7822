"""An ImageFolder archive decoded once into an on-disk uint8 cache of N x C x S x S records,
and the header-only check the API makes of an uploaded one (`inspect_imagefolder`).

Extracted once into the job's folder, decoded by DataLoader worker processes (DATA_WORKERS),
written in order to `images.u8` and read back per batch by `samples.RecordFile`: the job's
memory holds a few batches whatever the archive's size, and epochs read uint8 rows (a page
cache hit once warm) instead of decoding JPEGs again. A resumed job finds the cache complete
and skips both extraction and decoding.
"""

from __future__ import annotations

import errno
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from worker.pipeline.archives import MAX_MEMBERS, MAX_TOTAL_BYTES, safe_extract
from worker.pipeline.errors import DatasetError
from worker.pipeline.samples import DataSettings, RecordFile

Progress = Callable[[float, str], None]
# A decoded image costs width x height x 3 bytes before it is resized to the spec's few dozen
# pixels, and a small PNG of a huge blank canvas decodes to gigabytes (Pillow refuses only
# beyond ~179 M pixels, and merely warns beyond ~89 M). 8192 x 8192 (200 MB decoded) still
# takes a 48-megapixel photo.
MAX_IMAGE_PIXELS = 8192 * 8192
DECODE_BATCH = 32
CACHE_VERSION = 1  # bump when the decoding changes: older caches are rebuilt


def class_folders(root: Path) -> Path:
    """The folder whose subfolders are the classes, once archivers' metadata is gone."""
    # Archivers leave metadata folders (macOS: __MACOSX, ._* files) that are not classes.
    for junk in [p for p in root.rglob("*") if p.name.startswith((".", "__MACOSX"))]:
        if junk.is_dir():
            shutil.rmtree(junk, ignore_errors=True)
        elif junk.exists():
            junk.unlink()
    # Tolerate archives that wrap the class folders in one top-level folder.
    entries = list(root.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = [p for p in entries[0].iterdir() if p.is_dir()]
        if inner and all(any(q.is_file() for q in d.iterdir()) for d in inner):
            return entries[0]
    return root


@lru_cache(maxsize=64)
def _converts(mode: str) -> bool:
    """Whether PIL can turn an image of `mode` into RGB and L, tried on one pixel of it."""
    from PIL import Image

    try:
        Image.new(mode, (1, 1)).convert("RGB").convert("L")
    except (ValueError, OSError):
        return False
    return True


def check_header(img: Any, max_pixels: int) -> None:
    """What an opened image's header alone says (no pixel decoded): its size is within
    `max_pixels` and its mode converts to RGB. Raises ValueError saying which failed."""
    if img.width * img.height > max_pixels:
        raise ValueError(
            f"{img.width}x{img.height} pixels is over the limit of {max_pixels} "
            "pixels an image; scale the images down before uploading"
        )
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{img.width}x{img.height} pixels: an image needs at least one")
    if not _converts(img.mode):
        raise ValueError(f"{img.format} image of mode {img.mode}, which does not convert to RGB")


def decode_image(path: str, image_size: int, grayscale: bool, max_pixels: int) -> np.ndarray:
    """One image as uint8 C,H,W, exactly as IMAGE_PREPROCESS (and so every model card) tells
    users to do with their own: PIL decodes, converts to RGB, resizes the whole image
    bilinearly (antialiased when shrinking), then converts to grayscale when asked."""
    from PIL import Image

    with Image.open(path) as img:  # reads the header only: checked before decoding
        check_header(img, max_pixels)
        img = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
        if grayscale:
            img = img.convert("L")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@dataclass
class FolderSummary:
    labels: np.ndarray  # int64, one per image, in ImageFolder's order
    classes: list[str]


def inspect_imagefolder(
    archive: Path,
    workdir: Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> FolderSummary:
    """An ImageFolder archive's labels and classes, every image's header checked
    (`check_header`: PIL identifies the format, the size and mode are acceptable) and no
    pixel decoded: the API's check of an upload, cheap for tens of thousands of photos. An
    image whose data is damaged past its header fails the job's decoding instead, which
    names it (`build_image_cache`). Raises DatasetError naming a refused member."""
    from PIL import Image

    root = class_folders(
        safe_extract(
            archive,
            workdir / "imagefolder",
            max_members=max_members,
            max_total_bytes=max_total_bytes,
        )
    )
    folder = _image_folder(root, archive)
    for file, _ in folder.samples:
        try:
            with Image.open(file) as img:
                check_header(img, max_image_pixels)
        except Exception as e:  # any reader failure is the file's, and is named
            member = Path(file).relative_to(root).as_posix()
            raise DatasetError(f"{archive.name}: cannot decode {member} ({e})") from None
    return FolderSummary(np.asarray(folder.targets, np.int64), list(folder.classes))


def _image_folder(root: Path, archive: Path):
    """torchvision's ImageFolder over `root` (paths only: nothing opened), or DatasetError."""
    from torchvision import datasets  # torchvision loads slowly: only where archives are read

    try:
        return datasets.ImageFolder(str(root), loader=lambda p: p)
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"{archive.name}: not an ImageFolder archive ({e})") from None


class _Decoded(Dataset):
    """Image i of the folder, or the reason it cannot be decoded: a worker that raised would
    surface as a DataLoader error wrapping a traceback, not as the member's name."""

    def __init__(self, samples: list[tuple[str, int]], size: int, gray: bool, max_pixels: int):
        self.samples, self.size, self.gray, self.max_pixels = samples, size, gray, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, decode_image(self.samples[i][0], self.size, self.gray, self.max_pixels), None
        except Exception as e:  # any decoder failure is the file's, and is named
            return i, None, str(e) or type(e).__name__


def _as_list(batch):
    return batch


@dataclass
class ImageCache:
    images: RecordFile
    labels: np.ndarray
    classes: list[str]
    info: dict[str, Any]  # archive bytes, images, decode seconds and images/s


def _key(archive: Path, size: int, gray: bool) -> dict[str, Any]:
    st = archive.stat()
    return {
        "version": CACHE_VERSION,
        "archive": archive.name,
        "archive_bytes": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "image_size": size,
        "grayscale": gray,
    }


def _reuse(folder: Path, key: dict[str, Any]) -> ImageCache | None:
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key:
        return None
    labels = np.load(folder / "labels.npy")
    images = RecordFile(
        folder / "images.u8",
        offset=0,
        dtype=np.uint8,
        sample_shape=tuple(meta["sample_shape"]),
        n=len(labels),
    )
    return ImageCache(images, labels, meta["classes"], {**meta["info"], "reused": True})


def _check_space(folder: Path, need: int, archive: Path) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DatasetError(
            f"{archive.name}: the worker's disk is full: decoding the images needs "
            f"{need / 1e6:.0f} MB and {free / 1e6:.0f} MB are free"
        )


def _write(
    folder: Path, ds: _Decoded, root: Path, archive: Path, settings: DataSettings, progress
) -> None:
    loader = DataLoader(
        ds,
        batch_size=DECODE_BATCH,
        num_workers=settings.resolved_workers(),
        collate_fn=_as_list,
    )
    done, report_at = 0, 0.0
    with open(folder / "images.u8.part", "wb") as out:
        for batch in loader:
            for i, img, err in batch:  # batches arrive in order: rows are written in order
                if err is not None:
                    member = Path(ds.samples[i][0]).relative_to(root).as_posix()
                    raise DatasetError(f"{archive.name}: cannot decode {member} ({err})")
                out.write(img.tobytes())
            done += len(batch)
            if progress is not None and (time.monotonic() > report_at or done == len(ds)):
                report_at = time.monotonic() + 1.0
                progress(done / len(ds), f"decoded {done}/{len(ds)} images")
    (folder / "images.u8.part").rename(folder / "images.u8")


def build_image_cache(
    archive: Path,
    image_size: int,
    grayscale: bool,
    workdir: Path,
    *,
    settings: DataSettings,
    progress: Progress | None = None,
    max_members: int = MAX_MEMBERS,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> ImageCache:
    """Decode the archive's images once into `workdir/images-<size>-<mode>/` (or reuse the
    cache an earlier attempt completed). Raises DatasetError naming an undecodable member or
    a full disk; nothing is left behind on failure."""
    if not archive.is_file():
        raise DatasetError(f"{archive}: no such file")
    key = _key(archive, image_size, grayscale)
    folder = workdir / f"images-{image_size}-{'L' if grayscale else 'RGB'}"
    if (cached := _reuse(folder, key)) is not None:
        return cached
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        limits = (max_members, max_total_bytes, max_image_pixels)
        return _build(archive, folder, key, settings, progress, limits)
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise DatasetError(
                f"{archive.name}: the worker's disk is full (no space left while decoding images)"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _build(
    archive: Path,
    folder: Path,
    key: dict[str, Any],
    settings: DataSettings,
    progress: Progress | None,
    limits: tuple[int, int, int],
) -> ImageCache:
    max_members, max_total, max_pixels = limits
    started = time.perf_counter()
    if progress is not None:
        progress(0.0, f"extracting {archive.name}")
    extracted = safe_extract(
        archive, folder / "extracted", max_members=max_members, max_total_bytes=max_total
    )
    try:
        root = class_folders(extracted)
        folder_ds = _image_folder(root, archive)
        extract_seconds = time.perf_counter() - started
        size, gray = key["image_size"], key["grayscale"]
        shape = (1 if gray else 3, size, size)
        _check_space(folder, len(folder_ds) * int(np.prod(shape)), archive)
        ds = _Decoded(folder_ds.samples, size, gray, max_pixels)
        t0 = time.perf_counter()
        _write(folder, ds, root, archive, settings, progress)
        decode_seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(extracted, ignore_errors=True)
    labels = np.asarray(folder_ds.targets, np.int64)
    np.save(folder / "labels.npy", labels)
    info = {
        "archive_bytes": key["archive_bytes"],
        "images": len(labels),
        "cache_bytes": len(labels) * int(np.prod(shape)),
        "extract_seconds": round(extract_seconds, 3),
        "decode_seconds": round(decode_seconds, 3),
        "decode_images_per_second": round(len(labels) / max(decode_seconds, 1e-9), 1),
        "decode_workers": settings.resolved_workers(),
    }
    meta = {
        "key": key,
        "sample_shape": list(shape),
        "classes": list(folder_ds.classes),
        "info": info,
    }
    (folder / "meta.json").write_text(json.dumps(meta))  # last: marks the cache complete
    cache = _reuse(folder, key)
    assert cache is not None
    cache.info["reused"] = False
    return cache
