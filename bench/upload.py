"""A 2 GiB dataset uploaded through the CLI (`distillery datasets upload`), which sends it in
parts (POST /v1/uploads), to `distillery api` on loopback. Measured:

- the API process's RSS over the whole upload (parts, verification, inspection), sampled every
  0.1 s: its growth over the RSS before the upload (target < 100 MB);
- a cut connection: the CLI's connection goes through a TCP relay that counts the bytes the
  CLI sends; the relay cuts every connection once about half the file has passed and refuses
  new ones, so the CLI gives up. A second CLI run (a new relay, counting afresh) resumes the
  same upload: the bytes it sends are compared with the parts the server lacked (target: no
  finished part sent again, i.e. at most the missing parts plus request headers).

The file is an uncompressed `.npz` of uint8 images (N,3,64,64) and labels, generated once
under bench/.cache/ (a sparse file: zeros cost no disk until written into the npz).

    python -m bench.upload [--gib 2] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from bench.common import REPO, command_line, machine, markers, utc_now, write_section

NAME = "upload"
CACHE = REPO / "bench" / ".cache"
KEY = "dk_bench_upload_key_0123456789"
RSS_TARGET = 100 * 1024**2
IMAGE = (3, 64, 64)


def dataset(gib: float) -> Path:
    """An uncompressed .npz of about `gib` GiB (cached)."""
    n = int(gib * 1024**3) // int(np.prod(IMAGE))
    path = CACHE / f"upload-{n}.npz"
    if path.is_file():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    raw = CACHE / "upload-x.raw"
    x = np.memmap(raw, dtype=np.uint8, mode="w+", shape=(n, *IMAGE))  # sparse: zeros
    x[:, 0, 0, 0] = np.arange(n) % 251  # something in every image
    x.flush()
    part = path.with_suffix(".part")
    np.savez(part, x=x, y=(np.arange(n) % 10).astype(np.int64))  # np.savez writes in chunks
    del x
    raw.unlink()
    part.with_suffix(".part.npz").rename(path)
    return path


# --- the API and a counting relay ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pid: int) -> int:
    """The process's resident set, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextmanager
def api(home: Path) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DISTILLERY_", "STORAGE_"))},
        "DISTILLERY_HOME": str(home),
        "DISTILLERY_API_KEY": KEY,
        "OMP_NUM_THREADS": "1",
    }
    with open(home.parent / "api.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "api", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; see {home.parent / 'api.log'}")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


class Relay:
    """TCP from the CLI to the API that counts the bytes the CLI sends; with `cut_after`, every
    connection is cut once that many bytes have passed, and new ones are refused."""

    def __init__(self, target: str, cut_after: int | None = None) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.lock = threading.Lock()
        self.reset(cut_after)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self, cut_after: int | None = None) -> None:
        """Count afresh, and let connections through again (the same address: the client
        remembers its upload per server URL)."""
        with self.lock:
            self.cut_after, self.sent, self.cut = cut_after, 0, False

    def _accept(self) -> None:
        while True:
            conn, _ = self.server.accept()
            if self.cut:
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            self.open += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        with suppress(OSError):
            while data := src.recv(1 << 16):
                if counted:
                    with self.lock:
                        self.sent += len(data)
                        if self.cut_after is not None and self.sent >= self.cut_after:
                            self.cut = True
                    if self.cut:
                        break
                dst.sendall(data)
        for s in (src, dst) if not self.cut else self.open:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@dataclass
class RssSampler:
    pid: int
    samples: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> RssSampler:
        def sample() -> None:
            while not self.stop.wait(0.1):
                with suppress(OSError, RuntimeError):
                    self.samples.append(rss(self.pid))

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def cli_upload(url: str, path: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DISTILLERY_URL": url,
        "DISTILLERY_API_KEY": KEY,
        "XDG_CACHE_HOME": str(cache),
    }
    return subprocess.run(
        [sys.executable, "-m", "distillery", "datasets", "upload", str(path), "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )


def warm_up(url: str, headers: dict[str, str], tmp: Path) -> None:
    """One small upload first: what any first upload loads once (the .npz inspection's
    modules) is not growth per upload."""
    small = tmp / "warm.npz"
    np.savez(small, x=np.zeros((20, *IMAGE), np.uint8), y=np.arange(20) % 10)
    with open(small, "rb") as f:
        r = httpx.post(f"{url}/v1/datasets", headers=headers, files={"file": f}, timeout=120)
    r.raise_for_status()


# --- the measurement ---------------------------------------------------------------------------


def measure(gib: float) -> dict:
    path = dataset(gib)
    size = path.stat().st_size
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        home, cache = Path(tmp) / "home", Path(tmp) / "cache"
        home.mkdir()
        with api(home) as (url, pid):
            headers = {"Authorization": f"Bearer {KEY}"}
            warm_up(url, headers, Path(tmp))
            baseline = rss(pid)
            cut = Relay(url, cut_after=size // 2)
            t0 = time.perf_counter()
            with RssSampler(pid) as sampled:
                first = cli_upload(cut.url, path, cache)
                state = json.loads((cache / "distillery" / "uploads.json").read_text())
                upload_id = next(iter(state.values()))
                held = httpx.get(f"{url}/v1/uploads/{upload_id}", headers=headers).json()
                first_sent, parts_peak = cut.sent, max(sampled.samples)
                cut.reset()
                t1 = time.perf_counter()
                second = cli_upload(cut.url, path, cache)
                t2 = time.perf_counter()
        if second.returncode != 0:
            raise RuntimeError(f"the resumed upload failed: {second.stderr[-2000:]}")
    held_bytes = sum(p["bytes"] for p in held["parts"])
    dataset_row = json.loads(second.stdout)
    return {
        "file_bytes": size,
        "part_bytes": held["part_bytes"],
        "parts_total": held["parts_total"],
        "first_exit": first.returncode,
        "first_sent": first_sent,
        "parts_held": len(held["parts"]),
        "held_bytes": held_bytes,
        "second_sent": cut.sent,
        "missing_bytes": size - held_bytes,
        "resent_bytes": max(0, cut.sent - (size - held_bytes)),
        "rss_peak_run1": parts_peak,
        "rss_baseline": baseline,
        "rss_peak": max(sampled.samples),
        "rss_growth": max(sampled.samples) - baseline,
        "first_seconds": t1 - t0,
        "second_seconds": t2 - t1,
        "sha256_ok": dataset_row["sha256"] and dataset_row["bytes"] == size,
        "num_samples": dataset_row["num_samples"],
    }


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB"


def report(m: dict) -> tuple[str, bool]:
    rss_ok = m["rss_growth"] < RSS_TARGET
    # Request headers and JSON: a few KB per part, far below one part of 16 MiB.
    resume_ok = m["resent_bytes"] < m["part_bytes"] and m["parts_held"] > 0
    rows = [
        (
            "file",
            f"{_mib(m['file_bytes'])} .npz, {m['num_samples']:,} samples, "
            f"{m['parts_total']} parts of {_mib(m['part_bytes'])}",
        ),
        ("API RSS before the upload (after one small upload)", _mib(m["rss_baseline"])),
        ("API RSS peak during run 1 (parts only)", _mib(m["rss_peak_run1"])),
        ("API RSS peak during both runs (parts, verifying, inspecting)", _mib(m["rss_peak"])),
        (
            "**API RSS growth** (target < 100 MB)",
            f"**{_mib(m['rss_growth'])}** ({'met' if rss_ok else 'MISSED'})",
        ),
        (
            "run 1: bytes sent before the cut",
            f"{_mib(m['first_sent'])}, CLI exit {m['first_exit']}, {m['first_seconds']:.0f} s",
        ),
        ("parts the API held after the cut", f"{m['parts_held']} ({_mib(m['held_bytes'])})"),
        ("run 2: bytes the parts it lacked", _mib(m["missing_bytes"])),
        (
            "**run 2: bytes sent** (relay count)",
            f"**{_mib(m['second_sent'])}**, "
            f"{m['second_seconds']:.0f} s incl. hashing, verifying and inspecting",
        ),
        (
            "run 2 minus the missing parts (headers; a re-sent part would add 16 MiB)",
            f"{m['resent_bytes']:,} bytes ({'met' if resume_ok else 'MISSED'})",
        ),
    ]
    table = "| measured | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    return table, rss_ok and resume_ok


def run(profile: str, write: Path | None, gib: float = 2.0) -> bool:
    m = measure(gib)
    table, ok = report(m)
    print(table)
    if write is not None:
        start, end = markers(NAME)
        body = (
            f"{start}\n## Upload: 2 GiB through the CLI, cut and resumed\n\n"
            f"`{command_line()}` on {machine()}, {utc_now()}.\n\n"
            "A 2 GiB dataset through the CLI (`distillery datasets upload`, which goes in parts "
            "above 64 MiB) to `distillery api` (SQLite, local store) on loopback. The CLI's "
            "traffic passes a TCP relay that counts the bytes it sends; in run 1 the relay cuts "
            "every connection at half the file and refuses new ones, so the CLI gives up; run 2 "
            "(the relay counting afresh, letting connections through) resumes the same upload. API RSS sampled every 0.1 s over both runs.\n\n"
            + table
            + f"\n{end}"
        )
        write_section(write, NAME, body)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload", description=__doc__)
    parser.add_argument("--gib", type=float, default=2.0, help="size of the dataset file")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    return 0 if run("default", args.write, args.gib) else 1


if __name__ == "__main__":
    sys.exit(main())
