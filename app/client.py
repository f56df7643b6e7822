"""A Python client for the Distillery API, typed with the API's own schemas.

    from app.client import Client
    with Client() as c:                       # DISTILLERY_URL, DISTILLERY_API_KEY
        job = c.submit("examples/digits.json")
        job = c.wait(job.id, timeout=600)
        c.download(job.id, "model.int8.onnx", "out/")

Transient failures (connection errors, 429/502/503/504, honouring Retry-After) are retried
for GETs and for POSTs that carry an Idempotency-Key (submit always sends one), never for
other POSTs: a retried POST must not create a second job.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from app.jobs.states import TERMINAL
from app.schemas.jobs import (
    ArtifactPublic,
    ArtifactsPublic,
    HistoryPublic,
    HistoryRowPublic,
    JobPublic,
    JobsPublic,
)
from app.schemas.uploads import DatasetPublic, ModelPublic
from worker.pipeline.files import sha256_file

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUS = {429, 502, 503, 504}


class ApiError(Exception):
    """The API answered with an error: `status`, `code` (e.g. invalid_spec) and `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class WaitTimeout(Exception):
    def __init__(self, job: JobPublic, timeout: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout:.0f}s")
        self.job = job


class DownloadError(Exception):
    pass


@dataclass
class Event:
    id: int
    type: str
    data: dict[str, Any]


def default_key() -> str | None:
    key = os.environ.get("DISTILLERY_API_KEY")
    if key:
        return key
    # `distillery serve` keeps its key here: handy on the machine that runs it.
    path = Path(os.environ.get("DISTILLERY_HOME", ".distillery")) / "api_key"
    return path.read_text().strip() if path.is_file() else None


def _retry_after(response: httpx.Response | None, attempt: int, backoff: float) -> float:
    if response is not None and (value := response.headers.get("Retry-After")):
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    return backoff * (2**attempt)


class Client:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = (url or os.environ.get("DISTILLERY_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or default_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )
        self.retries, self.backoff, self.max_retry_wait, self.sleep = (
            retries,
            backoff,
            max_retry_wait,
            sleep,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # -- transport ------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = kw.get("headers") or {}
        retryable = method in ("GET", "HEAD") or "Idempotency-Key" in headers
        attempt = 0
        while True:
            response = None
            try:
                response = self.http.request(method, path, **kw)
                if (
                    response.status_code not in RETRY_STATUS
                    or not retryable
                    or attempt >= self.retries
                ):
                    break
            except httpx.TransportError:
                if not retryable or attempt >= self.retries:
                    raise
            self.sleep(min(_retry_after(response, attempt, self.backoff), self.max_retry_wait))
            attempt += 1
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                raise ApiError(response.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:500]) from None
        return response

    # -- jobs -------------------------------------------------------------------------------------

    def submit(
        self, spec: dict[str, Any] | str | Path, *, idempotency_key: str | None = None
    ) -> JobPublic:
        """Submit a spec (a dict, or the path of a JSON file). A fresh Idempotency-Key is sent
        unless one is given, so a retried submit never makes a second job."""
        if isinstance(spec, str | Path):
            spec = json.loads(Path(spec).read_text())
        key = idempotency_key or f"client-{uuid.uuid4()}"
        r = self.request("POST", "/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        return JobPublic.model_validate(r.json())

    def get(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self.request("GET", f"/v1/jobs/{job_id}").json())

    def list(
        self, *, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> JobsPublic:
        params = {
            k: v
            for k, v in {"status": status, "limit": limit, "after": after}.items()
            if v is not None
        }
        return JobsPublic.model_validate(self.request("GET", "/v1/jobs", params=params).json())

    def iter_jobs(self, *, status: str | None = None, page_size: int = 100) -> Iterator[JobPublic]:
        after = None
        while True:
            page = self.list(status=status, limit=page_size, after=after)
            yield from page.data
            if not page.has_more:
                return
            after = page.next_after

    def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_update: Callable[[JobPublic], None] | None = None,
    ) -> JobPublic:
        """Poll until the job ends; raises WaitTimeout (holding the last state) after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(job, timeout or 0)
            wait = poll if deadline is None else min(poll, max(deadline - time.monotonic(), 0.0))
            self.sleep(wait)

    def events(self, job_id: str, *, after: int = 0) -> Iterator[Event]:
        """The job's server-sent events from its first (or after `after`) until it ends;
        reconnects with Last-Event-ID when the stream drops."""
        last = after
        failures = 0
        while True:
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers={"Last-Event-ID": str(last)},
                    timeout=httpx.Timeout(None, connect=10),
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        err = r.json().get("error", {})
                        raise ApiError(
                            r.status_code, err.get("code", "http_error"), err.get("message", r.text)
                        )
                    fields: dict[str, str] = {}
                    for line in r.iter_lines():
                        if line == "":
                            if "event" in fields:
                                event = Event(
                                    int(fields.get("id", last)),
                                    fields["event"],
                                    json.loads(fields.get("data", "{}")),
                                )
                                last = event.id
                                yield event
                                if event.type == "end":
                                    return
                            fields = {}
                        elif not line.startswith(":") and ": " in line:
                            name, value = line.split(": ", 1)
                            fields[name] = value
                    return
            except httpx.TransportError:
                failures += 1
                if failures > self.retries:
                    raise
                self.sleep(self.backoff * (2 ** (failures - 1)))

    def history(self, job_id: str) -> list[HistoryRowPublic]:
        """Every epoch of every training run of the job, in the order they ran."""
        r = self.request("GET", f"/v1/jobs/{job_id}/history")
        return HistoryPublic.model_validate(r.json()).data

    def history_csv(self, job_id: str) -> str:
        """The same rows as CSV (the columns of history.csv)."""
        return self.request(
            "GET", f"/v1/jobs/{job_id}/history", headers={"Accept": "text/csv"}
        ).text

    # -- artifacts --------------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[ArtifactPublic]:
        return ArtifactsPublic.model_validate(
            self.request("GET", f"/v1/jobs/{job_id}/artifacts").json()
        ).data

    def download(
        self,
        job_id: str,
        name: str,
        dest: str | Path,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download an artifact to `dest` (a folder or a file path), verify its sha256, and
        resume from a partial `.part` file with a Range request if an earlier try was cut off."""
        artifact = next((a for a in self.artifacts(job_id) if a.name == name), None)
        if artifact is None:
            raise ApiError(404, "artifact_not_found", f"job {job_id} has no artifact {name!r}")
        dest = Path(dest)
        target = dest / name if dest.is_dir() or str(dest).endswith("/") else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        for fresh in (False, True):
            if fresh:
                part.unlink(missing_ok=True)
            self._fetch(artifact, part, on_progress)
            if sha256_file(part) == artifact.sha256:
                os.replace(part, target)
                return target
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: sha256 does not match after a fresh download")

    def _fetch(self, artifact: ArtifactPublic, part: Path, on_progress) -> None:
        attempt = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have >= artifact.bytes:
                return
            headers = (
                {"Range": f"bytes={have}-", "If-Range": f'"{artifact.sha256}"'} if have else {}
            )
            try:
                with self.http.stream(
                    "GET", artifact.url, headers=headers, timeout=httpx.Timeout(60, connect=10)
                ) as r:
                    if r.status_code in RETRY_STATUS:
                        raise httpx.TransportError(f"status {r.status_code}")
                    if r.status_code >= 400:
                        r.read()
                        raise ApiError(r.status_code, "download_failed", r.text[:300])
                    mode = "ab" if r.status_code == 206 else "wb"  # 200: the server sent it whole
                    done = have if mode == "ab" else 0
                    with open(part, mode) as f:
                        for chunk in r.iter_bytes(1 << 20):
                            f.write(chunk)
                            done += len(chunk)
                            if on_progress is not None:
                                on_progress(done, artifact.bytes)
                return
            except httpx.TransportError:
                attempt += 1
                if attempt > self.retries:
                    raise
                self.sleep(self.backoff * (2 ** (attempt - 1)))

    # -- uploads ----------------------------------------------------------------------------------

    def upload_dataset(self, path: str | Path) -> DatasetPublic:
        path = Path(path)
        with open(path, "rb") as f:
            r = self.request("POST", "/v1/datasets", files={"file": (path.name, f)}, timeout=None)
        return DatasetPublic.model_validate(r.json())

    def upload_model(
        self,
        path: str | Path,
        *,
        format: str | None = None,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        input_shape: list[int] | tuple[int, ...] | None = None,
        num_classes: int | None = None,
    ) -> ModelPublic:
        path = Path(path)
        fields = {
            "format": format,
            "arch": arch,
            "arch_kwargs": json.dumps(arch_kwargs) if arch_kwargs else None,
            "input_shape": ",".join(str(d) for d in input_shape) if input_shape else None,
            "num_classes": str(num_classes) if num_classes else None,
        }
        with open(path, "rb") as f:
            r = self.request(
                "POST",
                "/v1/models",
                files={"file": (path.name, f)},
                data={k: v for k, v in fields.items() if v is not None},
                timeout=None,
            )
        return ModelPublic.model_validate(r.json())
