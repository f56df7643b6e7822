"""How long the API's check of an uploaded ImageFolder archive takes (`POST /v1/datasets`
without the HTTP: `app.services.uploads._describe_dataset`, i.e. safe extraction, then each
image checked, then the labels). A probe, not a benchmark with a target (`python -m bench`
does not run it). Then, on the extracted images alone: every header read (what the check does
now) against every image decoded at 32 px (what it did before).

The archive: `--images` generated JPEGs at 224 x 224 (noise over a colour, quality 90) in 4
class folders, a .zip generated once under bench/.cache/. Run it against another checkout to
compare (the tree on PYTHONPATH is the one measured):

    python -m bench.upload_check [--images 2000] [--repeats 3]
    PYTHONPATH=/path/to/other/checkout python bench/upload_check.py
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from app.core.config import Settings
from app.services import uploads

CACHE = Path(__file__).resolve().parent / ".cache"


def archive(n: int) -> Path:
    """A .zip of `n` 224-px JPEGs in 4 class folders (cached)."""
    from PIL import Image

    path = CACHE / f"upload-check-{n}.zip"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    part = path.with_suffix(".part")
    with zipfile.ZipFile(part, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            colour = np.asarray(
                [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)][i % 4]
            )
            pixels = np.clip(colour + rng.normal(0, 30, (224, 224, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
            zf.writestr(f"class{i % 4}/{i:05d}.jpg", buf.getvalue())
    part.rename(path)
    return path


def images_alone(path: Path) -> tuple[float, float]:
    """Seconds to read every header, and to decode every image at 32 px, once extracted."""
    from PIL import Image

    from worker.pipeline.archives import safe_extract
    from worker.pipeline.imagecache import MAX_IMAGE_PIXELS, check_header, decode_image

    with tempfile.TemporaryDirectory() as work:
        root = safe_extract(path, Path(work) / "x", max_members=10**6, max_total_bytes=4 << 30)
        files = sorted(str(p) for p in root.rglob("*.jpg"))
        t0 = time.perf_counter()
        for f in files:
            with Image.open(f) as img:
                check_header(img, MAX_IMAGE_PIXELS)
        t1 = time.perf_counter()
        for f in files:
            decode_image(f, 32, False, MAX_IMAGE_PIXELS)
        return t1 - t0, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upload_check")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    path = archive(args.images)
    settings = Settings()
    seconds = []
    for _ in range(args.repeats + 1):  # the first also pays the imports (torch, torchvision)
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            meta = uploads._describe_dataset(path, "imagefolder", settings, Path(work), path.name)
            seconds.append(time.perf_counter() - t0)
    assert meta["num_samples"] == args.images, meta
    print(f"{args.images} JPEGs at 224 px ({path.stat().st_size / 1e6:.1f} MB .zip), checked by")
    print(f"  {uploads.__file__}")
    print(f"  first check (with imports): {seconds[0]:.2f} s")
    print(f"  then seconds per check: {', '.join(f'{s:.2f}' for s in seconds[1:])}")
    print(f"  median {statistics.median(seconds[1:]):.2f} s; load average {os.getloadavg()}")
    try:
        headers, decoding = images_alone(path)
    except ImportError:  # a checkout from before check_header: the whole check only
        return
    print(f"  images alone: headers {headers:.2f} s, decoded at 32 px {decoding:.2f} s")


if __name__ == "__main__":
    main()
