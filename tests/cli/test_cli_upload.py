"""`distillery datasets upload` of a file over 64 MiB against `serve`: it goes in parts
(POST /v1/uploads) by itself and gives the same dataset a one-request upload would."""

import hashlib
import json

import numpy as np

from tests.service_support import run_cli


def test_a_large_dataset_goes_up_in_parts_through_the_cli(served, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.random((17_000, 1, 32, 32), dtype=np.float32)  # ~66 MiB of noise: 5 parts
    np.savez(tmp_path / "noise.npz", x=x, y=np.arange(17_000) % 4)
    path = tmp_path / "noise.npz"
    assert path.stat().st_size > 64 * 1024**2
    cache = tmp_path / "cache"
    code, out, err = run_cli(
        served, "datasets", "upload", str(path), "--json", env={"XDG_CACHE_HOME": str(cache)}
    )
    assert code == 0, err
    ds = json.loads(out)
    assert ds["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        ds["num_samples"] == 17_000 and ds["num_classes"] == 4 and ds["input_shape"] == [1, 32, 32]
    )
    # The resumable flow remembered the upload while it ran, and forgot it once complete.
    assert json.loads((cache / "distillery" / "uploads.json").read_text()) == {}
