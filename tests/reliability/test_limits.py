"""Inputs that used to take the API down: a real `distillery api` process, its memory read
from /proc while the requests go in and /healthz polled from a thread throughout.

Before the limits a 15 MB spec took the API to 13 GB and it stopped answering; a 60 KB spec
of 20,000 layers took 19 s and was accepted; `Content-Length: 1000000000` held the
connection; a 1.5 MB .npz was expanded to 1.6 GB in the API's memory.

These tests check what the API answers and that it keeps answering; how soon it answers is
measured by `python -m bench --only recovery` (timing belongs in bench/, not in asserts).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from numpy.lib import format as npy

from tests.service_support import TINY_SPEC, post_declaring, running_stack, wait_until

pytestmark = pytest.mark.reliability

MB = 1 << 20
HUNG = 30.0  # seconds without an answer: the API hangs (how fast it answers is bench.recovery's)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("limits")) as s:
        with s.client() as c:  # one ordinary job first: the bad requests are measured alone
            assert c.post("/v1/jobs", json=TINY_SPEC).status_code == 201
        yield s


def _kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} for process {pid}")


@dataclass
class Watch:
    """The API's peak memory above its start, and every /healthz answer, while watched."""

    answers: list[tuple[int | str, float]] = field(default_factory=list)
    growth_mb: float = 0.0


@contextmanager
def watched(stack) -> Iterator[Watch]:
    (api,) = [p for p in stack.procs if p.args[3:4] == ["api"]]  # uvicorn serves in-process
    watch, stop = Watch(), threading.Event()
    # Reset the peak (VmHWM) to now; where that is refused, the peak since start counts.
    with contextlib.suppress(OSError):
        Path(f"/proc/{api.pid}/clear_refs").write_text("5")
    before = _kib(api.pid, "VmRSS")

    def poll() -> None:
        with httpx.Client(base_url=stack.url, timeout=HUNG) as c:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    status: int | str = c.get("/healthz").status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                watch.answers.append((status, time.perf_counter() - started))
                stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    wait_until(lambda: watch.answers, 10, interval=0.01, what="a first health check")
    try:
        yield watch
    finally:
        done = len(watch.answers)  # and one more answered after the requests went in
        wait_until(lambda: len(watch.answers) > done, 10, interval=0.01, what="a health check")
        stop.set()
        poller.join(timeout=10)
        watch.growth_mb = (_kib(api.pid, "VmHWM") - before) / 1024
    slowest = max(t for _, t in watch.answers)
    print(
        f"peak RSS growth {watch.growth_mb:.0f} MB; {len(watch.answers)} health checks, slowest {slowest:.3f} s"
    )
    assert all(status == 200 for status, _ in watch.answers), watch.answers


def _timed(what: str, request) -> httpx.Response:
    started = time.perf_counter()
    r = request()
    took = time.perf_counter() - started
    print(f"{what}: {r.status_code} in {took:.3f} s")  # for the log; bench.recovery measures
    return r


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    return r.json()["error"]["message"]


def test_oversized_and_unbounded_specs_are_refused_and_the_api_stays_small_and_up(stack):
    huge = json.dumps({"student": {"arch": "mlp", "arch_kwargs": {"hidden": [1] * 5_000_000}}})
    deep = json.dumps({"student": {"arch": "mlp", "arch_kwargs": {"hidden": [1] * 20_000}}})
    assert len(huge) > 15_000_000 and 55_000 < len(deep) < 65_000
    json_body = {"content-type": "application/json"}

    def chunked():  # 4 MiB without a Content-Length
        for _ in range(64):
            yield b" " * 65536

    with stack.client() as c, watched(stack) as watch:
        r = _timed("15 MB spec", lambda: c.post("/v1/jobs", content=huge, headers=json_body))
        assert "request body of" in _error(r, 413, "payload_too_large")
        r = _timed("20,000-layer spec", lambda: c.post("/v1/jobs", content=deep, headers=json_body))
        assert _error(r, 422, "invalid_spec") == (
            "student.arch_kwargs.hidden: a list of 20000 items; at most 64 are allowed"
        )
        r = _timed(
            "chunked 4 MiB", lambda: c.post("/v1/jobs", content=chunked(), headers=json_body)
        )
        assert _error(r, 413, "payload_too_large").startswith("request body is over the")
        r = _timed(
            "Content-Length: 1000000000",
            lambda: post_declaring(
                stack.url,
                "/v1/jobs",
                key=stack.key,
                length=1_000_000_000,
                content_type="application/json",
            ),
        )
        assert _error(r, 413, "payload_too_large").startswith("request body of 1000000000 bytes")
    assert watch.growth_mb < 200


def _bomb(path: Path, rows: int, cols: int) -> Path:
    """An .npz as np.savez_compressed writes it, whose x is rows x cols float32 zeros, written
    in blocks so that this process never holds it either."""
    header = {"descr": npy.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            npy.write_array_header_1_0(f, {**header, "shape": (rows, cols)})
            block = bytes(1000 * cols * 4)
            for _ in range(rows // 1000):
                f.write(block)
        with zf.open("y.npy", "w") as f:
            npy.write_array(f, np.arange(rows) % 10)
    return path


def test_a_compressed_npz_is_inspected_without_expanding_it_in_memory(stack, tmp_path):
    path = _bomb(tmp_path / "zeros.npz", rows=400_000, cols=1_000)  # x: 1.6 GB of float32
    assert path.stat().st_size < 2 * MB
    with stack.client() as c, watched(stack) as watch:
        started = time.perf_counter()
        r = c.post("/v1/datasets", files={"file": ("zeros.npz", path.read_bytes())})
        print(f"{path.stat().st_size / MB:.1f} MB npz of 1.6 GB: {r.status_code} in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    # Under the default MAX_ARCHIVE_BYTES (4 GiB) it is a dataset, described from a stream.
    assert r.status_code == 201, r.text
    assert r.json()["num_samples"] == 400_000 and r.json()["input_shape"] == [1_000]
    assert r.json()["num_classes"] == 10
    assert watch.growth_mb < 100
