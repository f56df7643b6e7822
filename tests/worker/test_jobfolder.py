"""A worker's copy of an uploaded file on a bucket store: fetched once, checked against the
sha256 recorded at upload, never left half-made or wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.core.storage import Storage, StorageError
from worker.jobfolder import local_input


class _Bucket(Storage):
    """A store that is not a shared folder, holding bytes in memory; counts its reads."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects, self.reads = objects, 0

    def get_file(self, key: str, dest: Path) -> None:
        self.reads += 1
        dest.write_bytes(self.objects[key])


def test_an_input_is_fetched_once_and_checked(tmp_path):
    data = b"digits" * 100
    bucket = _Bucket({"uploads/t/datasets/d1/x.npz": data})
    sha = hashlib.sha256(data).hexdigest()
    first = local_input(bucket, tmp_path, "uploads/t/datasets/d1/x.npz", sha)
    again = local_input(bucket, tmp_path, "uploads/t/datasets/d1/x.npz", sha)
    assert first == again == tmp_path / "inputs" / sha / "x.npz"
    assert first.read_bytes() == data and bucket.reads == 1
    assert sorted(p.name for p in first.parent.iterdir()) == ["x.npz"]


def test_an_input_that_does_not_match_its_sha256_is_refused_and_not_kept(tmp_path):
    bucket = _Bucket({"uploads/t/models/m1/t.onnx": b"tampered"})
    sha = hashlib.sha256(b"original").hexdigest()
    with pytest.raises(StorageError, match=r"t\.onnx does not match its sha256"):
        local_input(bucket, tmp_path, "uploads/t/models/m1/t.onnx", sha)
    assert list((tmp_path / "inputs" / sha).iterdir()) == []


def test_a_jobs_decoded_data_stays_on_the_worker_and_its_checkpoints_go_up(tmp_path):
    """The image cache can be gigabytes and is rebuilt from the upload on any host: pushing a
    job's work folder to the bucket sends its checkpoints, never the cache."""
    from worker.jobfolder import JobFolder
    from worker.pipeline.data import data_dir

    class _Recording(_Bucket):
        shared = False

        def put_file(self, key: str, src: Path) -> None:
            self.objects[key] = src.read_bytes()

    cache = data_dir(tmp_path) / "images-224-RGB" / "images.u8"
    ckpt = tmp_path / ".work" / "checkpoints" / "distill" / "distill.pt"
    for f in (cache, ckpt):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    bucket = _Recording({})
    JobFolder(bucket, "jobs/j1", tmp_path, sync_every=60).push()
    assert sorted(bucket.objects) == ["jobs/j1/.work/checkpoints/distill/distill.pt"]
