"""The store in a bucket: `distillery api` and `distillery worker`s on hosts of their own (each
its own working directory and DISTILLERY_HOME, no folder in common) with PostgreSQL, Redis
and an S3-compatible server on loopback (moto's standalone `moto_server`). What the API and
the workers exchange goes through the bucket, or the job fails: nothing reads another
host's disk.

Store faults go through `StoreProxy`, a plug between the service and the store."""

from __future__ import annotations

import hashlib
import random
import signal
import socket
import subprocess
import sys
import threading
import uuid
from contextlib import suppress
from pathlib import Path

import boto3
import httpx
import pytest

from app.client import Client
from tests import factories
from tests.service_support import (
    TINY_ARTIFACTS,
    TINY_SPEC,
    free_port,
    running_stack,
    sse_events,
    wait_for_status,
    wait_until,
)

BUCKET = "distillery"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3:
    def __init__(self, url: str) -> None:
        self.url = url
        self.client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def env(self, prefix: str, endpoint: str | None = None) -> dict[str, str]:
        """What every process of a stack on this store is told: the standard AWS variables."""
        return {
            "STORAGE_URL": f"s3://{BUCKET}/{prefix}",
            "AWS_ENDPOINT_URL": endpoint or self.url,
            **CREDENTIALS,
        }

    def objects(self, prefix: str) -> dict[str, bytes]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix + "/"
        )
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return {
            k[len(prefix) + 1 :]: self.client.get_object(Bucket=BUCKET, Key=k)["Body"].read()
            for k in keys
        }


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "ab")
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    store = S3(f"http://127.0.0.1:{port}")

    def answers() -> bool:
        with suppress(httpx.HTTPError):
            return httpx.get(store.url, timeout=2).status_code == 200
        return False

    try:
        wait_until(answers, 60, what="moto_server to answer")
        store.client.create_bucket(Bucket=BUCKET)
        yield store
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class StoreProxy:
    """TCP between the service and the store. `unplug()`: every open connection is cut and
    new ones are closed at once, as a store that went away; `plug()` undoes it."""

    def __init__(self, target_port: int, cut_after: int | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.cut_after = cut_after  # bytes a connection may send to the store before it is cut
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.up = True
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.server.accept()
            if not self.up:
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            self.open += [conn, upstream]
            for a, b, cap in ((conn, upstream, self.cut_after), (upstream, conn, None)):
                threading.Thread(target=self._pump, args=(a, b, cap), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, cap: int | None) -> None:
        sent = 0
        with suppress(OSError):
            while (data := src.recv(65536)) and (cap is None or sent + len(data) <= cap):
                dst.sendall(data)
                sent += len(data)
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def unplug(self) -> None:
        self.up = False
        for s in self.open:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.open.clear()

    def plug(self) -> None:
        self.up = True


def _storage(endpoint: str, tmp_path: Path):
    from app.core.config import Settings
    from app.core.storage import S3Storage

    settings = Settings(
        DISTILLERY_HOME=tmp_path / "home",
        S3_ENDPOINT_URL=endpoint,
        S3_ACCESS_KEY_ID="testing",
        S3_SECRET_ACCESS_KEY="testing",
        S3_MULTIPART_BYTES=5 * 1024**2,
        S3_CONNECT_TIMEOUT_SECONDS=1,
    )
    return S3Storage(f"s3://{BUCKET}/parts-{uuid.uuid4().hex[:8]}", settings)


def test_a_large_file_goes_up_in_parts_and_a_cut_upload_leaves_no_object(s3, tmp_path):
    from app.core.storage import StorageError

    big = tmp_path / "big.bin"
    big.write_bytes(random.randbytes(12 * 1024**2))
    whole = _storage(s3.url, tmp_path)
    whole.put_file("jobs/j/big.bin", big)
    head = s3.client.head_object(Bucket=BUCKET, Key=f"{whole.prefix}/jobs/j/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5, 5 and 2 MiB
    fetched = tmp_path / "fetched.bin"
    whole.get_file("jobs/j/big.bin", fetched)
    assert fetched.read_bytes() == big.read_bytes()
    # Every connection cut after 1 MiB: each 5 MiB part fails (after boto3's retries).
    proxy = StoreProxy(int(s3.url.rsplit(":", 1)[1]), cut_after=1024**2)
    cut = _storage(proxy.url, tmp_path)
    with pytest.raises(StorageError, match="unreachable|refused"):
        cut.put_file("jobs/j/cut.bin", big)
    assert cut.size("jobs/j/cut.bin") is None and whole.size("jobs/j/big.bin") == 12 * 1024**2
    uploads = s3.client.list_multipart_uploads(Bucket=BUCKET, Prefix=cut.prefix)
    assert uploads.get("Uploads", []) == []  # aborted: no parts left behind either


def _upload(c: httpx.Client, route: str, path: Path, **fields) -> httpx.Response:
    with open(path, "rb") as f:
        return c.post(route, files={"file": (path.name, f)}, data=fields)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_api_and_worker_on_hosts_of_their_own_share_only_the_store(s3, tmp_path):
    """Upload a dataset and a teacher to the API's host, run the job on the worker's host,
    download every artifact through the API (redirect to a presigned URL followed, sha256
    checked) and streamed with a Range; both hosts' disks keep nothing of the job."""
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    hosts = tmp_path / "api-host", tmp_path / "worker-host"
    npz = factories.digits_npz(tmp_path / "digits.npz", n=300)
    onnx = factories.user_teacher((1, 8, 8), 10, tmp_path / "teacher.onnx", "onnx")
    with running_stack(tmp_path, api_host=hosts[0], **s3.env(prefix)) as stack:
        stack.start_worker(host=hosts[1])
        with stack.client() as c:
            dataset = _upload(c, "/v1/datasets", npz).json()
            teacher = _upload(c, "/v1/models", onnx).json()
            spec = {
                **TINY_SPEC,
                "dataset": {"source": "upload", "id": dataset["id"]},
                "teacher": {"source": "upload", "id": teacher["id"]},
            }
            job_id = c.post("/v1/jobs", json=spec).json()["id"]
            job = wait_for_status(c, job_id, {"succeeded", "failed"}, timeout=300)
            assert job["status"] == "succeeded", job["error"]
            listed = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
            one = c.get(f"/v1/jobs/{job_id}/artifacts/model.onnx")
            streamed = c.get(
                f"/v1/jobs/{job_id}/artifacts/model.onnx?redirect=false",
                headers={"Range": "bytes=10-19"},
            )
            (tmp_path / "dl").mkdir()
            with Client(stack.url, stack.key) as client:
                got = {
                    a["name"]: client.download(job_id, a["name"], tmp_path / "dl") for a in listed
                }
    stored = s3.objects(prefix)
    # The uploads went into the bucket whole, under their rows' ids.
    uploads = {k.split("/", 2)[2]: v for k, v in stored.items() if k.startswith("uploads/")}
    assert set(uploads) == {
        f"datasets/{dataset['id']}/digits.npz",
        f"models/{teacher['id']}/teacher.onnx",
    }
    assert uploads[f"datasets/{dataset['id']}/digits.npz"] == npz.read_bytes()
    assert _sha(uploads[f"models/{teacher['id']}/teacher.onnx"]) == teacher["sha256"]
    # Every artifact is in the bucket, as listed, and came down the same through the API.
    assert {a["name"] for a in listed} == TINY_ARTIFACTS
    for a in listed:
        assert _sha(stored[f"jobs/{job_id}/{a['name']}"]) == a["sha256"]
        assert _sha(got[a["name"]].read_bytes()) == a["sha256"]
    assert one.status_code == 307 and one.headers["location"].startswith(s3.url)
    assert one.headers["etag"] == f'"{_by_name(listed)["model.onnx"]["sha256"]}"'
    assert streamed.status_code == 206
    assert streamed.content == stored[f"jobs/{job_id}/model.onnx"][10:20]
    assert streamed.headers["content-range"].endswith(f"/{_by_name(listed)['model.onnx']['bytes']}")
    # The checkpoints went up as the job ran; neither host kept a file of the job.
    assert any(k.startswith(f"jobs/{job_id}/.work/state/") for k in stored)
    for host in hosts:
        assert not [p for p in host.rglob("*") if job_id in p.name], host.name


def _by_name(listed: list[dict]) -> dict[str, dict]:
    return {a["name"]: a for a in listed}


def test_a_job_whose_worker_dies_resumes_on_a_fresh_host_from_the_stored_checkpoint(s3, tmp_path):
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    env = {**s3.env(prefix), "CHECKPOINT_SYNC_SECONDS": "0.5"}
    with running_stack(tmp_path, api_host=tmp_path / "api-host", **env) as stack:
        first = stack.start_worker(host=tmp_path / "host-1")
        spec = {**TINY_SPEC, "distill": {"epochs": 300}}
        with stack.client() as c:
            job_id = c.post("/v1/jobs", json=spec).json()["id"]
            ckpt = f"jobs/{job_id}/.work/checkpoints/distill/distill.pt"
            wait_until(lambda: ckpt in _keys(s3, prefix), 180, what="a distill checkpoint stored")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            wait_for_status(c, job_id, {"queued"}, timeout=60)
            stack.start_worker(host=tmp_path / "host-2")
            done = wait_for_status(c, job_id, {"succeeded", "failed"}, timeout=400)
            assert done["status"] == "succeeded", done["error"]
            events = sse_events(c, job_id)
            listed = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    # Host 2 had none of host 1's files: it resumed from what the bucket held.
    resumed = [d["stage"] for k, d in events if k == "stage" and d.get("resumed")]
    assert resumed == ["teacher", "baseline"]
    assert any(k == "log" and "resumed distill after epoch" in d["message"] for k, d in events)
    stored = s3.objects(prefix)
    assert {a["name"] for a in listed} == TINY_ARTIFACTS
    assert all(_sha(stored[f"jobs/{job_id}/{a['name']}"]) == a["sha256"] for a in listed)


def _keys(s3: S3, prefix: str) -> set[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) + 1 :] for page in pages for o in page.get("Contents", [])}


def test_a_store_that_goes_away_fails_uploads_with_503_and_jobs_with_storage_error(s3, tmp_path):
    """Unplugged during an upload: 503 storage_unavailable, no upload listed, nothing in the
    bucket. Unplugged during a job: the job fails with storage_error, never succeeded."""
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    proxy = StoreProxy(int(s3.url.rsplit(":", 1)[1]))
    env = {**s3.env(prefix, endpoint=proxy.url), "S3_CONNECT_TIMEOUT_SECONDS": "1"}
    npz = factories.digits_npz(tmp_path / "digits.npz", n=300)
    with running_stack(tmp_path, api_host=tmp_path / "api-host", **env) as stack:
        stack.start_worker(host=tmp_path / "worker-host")
        with stack.client() as c:
            proxy.unplug()
            refused = _upload(c, "/v1/datasets", npz)
            listed = c.get("/v1/datasets").json()["data"]
            proxy.plug()
            job_id = c.post("/v1/jobs", json={**TINY_SPEC, "distill": {"epochs": 300}}).json()["id"]
            wait_until(
                lambda: c.get(f"/v1/jobs/{job_id}").json()["stage"] == "distill",
                180,
                what="the job to reach distill",
            )
            proxy.unplug()
            done = wait_for_status(c, job_id, {"succeeded", "failed"}, timeout=300)
            proxy.plug()
            artifacts = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "storage_unavailable"
    assert "retry" in refused.json()["error"]["message"]
    assert listed == []
    assert not [k for k in _keys(s3, prefix) if k.startswith("uploads/")]
    assert done["status"] == "failed"
    assert done["error"]["code"] == "storage_error", done["error"]
    assert artifacts == []


def test_a_search_fans_out_over_hosts_and_a_lost_branch_resumes_from_the_store(s3, tmp_path):
    """The teacher on one host, the branches on hosts of their own: a branch reads the teacher
    from the bucket, pushes its candidates; its worker killed, it resumes on a fresh host;
    the finish gathers every branch's candidates from the bucket and publishes the front."""
    from tests.e2e.test_search_service import SEARCH

    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    env = {**s3.env(prefix), "CHECKPOINT_SYNC_SECONDS": "0.5", "HEARTBEAT_TIMEOUT_SECONDS": "15"}
    spec = {**SEARCH, "distill": {**SEARCH["distill"], "epochs": 60}}
    with running_stack(tmp_path, api_host=tmp_path / "api-host", **env) as stack:
        stack.start_worker(host=tmp_path / "host-1")
        stack.start_worker(host=tmp_path / "host-2")
        with stack.client() as c:
            job_id = c.post("/v1/jobs", json=spec).json()["id"]
            branches = wait_until(
                lambda: (
                    {b["branch"]: b["id"] for b in c.get(f"/v1/jobs/{job_id}").json()["branches"]}
                    or None
                ),
                180,
                what="branches",
            )
            wait_until(
                lambda: any(
                    k.startswith(".work/branches/1/") for k in _stored_of(s3, prefix, job_id)
                ),
                180,
                what="branch 1's first files in the bucket",
            )
            stack.kill_worker(stack.worker_of(branches[1]))
            stack.start_worker(host=tmp_path / "host-3")
            done = wait_for_status(c, job_id, {"succeeded", "failed", "cancelled"}, timeout=600)
            assert done["status"] == "succeeded", done["error"]
            candidates = c.get(f"/v1/jobs/{job_id}/candidates").json()["data"]
            listed = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert {b["branch"]: b["attempts"] for b in done["branches"]} == {0: 1, 1: 2}
    assert len(candidates) == 4
    stored = s3.objects(f"{prefix}/jobs/{job_id}")
    assert {"candidates.json", "pareto.png", "report.json"} <= {a["name"] for a in listed}
    for a in listed:
        assert _sha(stored[a["name"]]) == a["sha256"], a["name"]
    # Each front model is a download of its own.
    front = [x for x in candidates if x["on_front"]]
    names = {a["name"] for a in listed}
    assert front and all(set(x["artifacts"]) <= names for x in front)


def _stored_of(s3: S3, prefix: str, job_id: str) -> set[str]:
    return {k.removeprefix(f"jobs/{job_id}/") for k in _keys(s3, prefix)}
