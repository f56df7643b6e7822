"""The Python client of the Distillery API, sync (`Client`) and async (`AsyncClient`), typed
with the API's own public models (distillery.schemas).

    from distillery import Client
    with Client() as c:                       # DISTILLERY_URL, DISTILLERY_API_KEY
        job = c.submit("examples/digits.json")
        job = c.wait(job.id, timeout=600)
        c.download(job.id, "model.int8.onnx", "out/")

Only what is safe is retried: connection errors and 429/502/503/504 (honouring Retry-After)
for GETs, DELETEs and POSTs that carry an Idempotency-Key (submit always sends one), never
other POSTs: a retried POST must not create a second job or endpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse, connect_sse
from pydantic import BaseModel

from distillery.calls import ApiError, Call
from distillery.calls import parse_model as _model
from distillery.resumable import (
    RESUMABLE_ABOVE,
    PartUrlExpired,
    Progress,
    SendPart,
    UploadPlan,
    part_call,
    sha256_file,
    upload_flow,
)
from distillery.schemas import (
    ArtifactPublic,
    ArtifactsPublic,
    CandidatePublic,
    CandidatesPublic,
    DatasetPublic,
    DatasetsPublic,
    DeliveriesPublic,
    HistoryPublic,
    HistoryRowPublic,
    JobPublic,
    JobsPublic,
    ModelPublic,
    ModelsPublic,
    SubmittedJob,
    WebhookCreate,
    WebhookCreated,
    WebhookPublic,
    WebhookSecretPublic,
    WebhooksPublic,
)
from distillery.states import TERMINAL

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUS = frozenset({429, 502, 503, 504})
# DELETE: a second one finds nothing to do; PUT (a part of an upload): sent again, it replaces
# itself.
SAFE_METHODS = frozenset({"GET", "HEAD", "DELETE", "PUT"})
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class WaitTimeout(Exception):
    """`wait` gave up; `job` is the last state seen (the job itself keeps running)."""

    def __init__(self, job: JobPublic, timeout: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout:.0f}s")
        self.job = job


class DownloadError(Exception):
    """An artifact's bytes did not match its sha256, even after a fresh download."""


@dataclass
class Event:
    """One server-sent event of a job: `type` is status, stage, progress, log, metrics,
    history, or the last one, end. `data` holds its fields, `at` among them."""

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


def retry_delay(response: httpx.Response | None, attempt: int, backoff: float) -> float:
    """Retry-After when the server sent one (seconds or a date), else exponential backoff."""
    if response is not None and (value := response.headers.get("Retry-After")):
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    return backoff * (2**attempt)


def _retryable(method: str, headers: dict[str, str] | None) -> bool:
    return method in SAFE_METHODS or "Idempotency-Key" in (headers or {})


def api_error(response: httpx.Response) -> ApiError:
    """The `{"error": {"code", "message"}}` body as an exception (any other body, quoted)."""
    try:
        err = response.json()["error"]
        return ApiError(response.status_code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "http_error", response.text[:500])


def _event(sse: ServerSentEvent, last: int) -> Event:
    return Event(int(sse.id) if sse.id else last, sse.event, json.loads(sse.data or "{}"))


def load_spec(spec: dict[str, Any] | str | Path) -> dict[str, Any]:
    return json.loads(Path(spec).read_text()) if isinstance(spec, str | Path) else spec


# --- the requests, shared by both clients ----------------------------------------------------


def _none(_: httpx.Response) -> None:
    return None


def _page_params(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _submitted(r: httpx.Response) -> SubmittedJob:
    job = SubmittedJob.model_validate(r.json())
    job.replayed = r.headers.get("Idempotent-Replayed", "").lower() == "true"
    return job


def _model_fields(
    format: str | None,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    input_shape: list[int] | tuple[int, ...] | None,
    num_classes: int | None,
) -> dict[str, str]:
    fields = {
        "format": format,
        "arch": arch,
        "arch_kwargs": json.dumps(arch_kwargs) if arch_kwargs else None,
        "input_shape": ",".join(str(d) for d in input_shape) if input_shape else None,
        "num_classes": str(num_classes) if num_classes else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


class Calls:
    """Every request of the API, as data."""

    @staticmethod
    def submit(spec: dict[str, Any], key: str | None) -> Call[SubmittedJob]:
        # A fresh key unless one is given: a retried submit never makes a second job.
        headers = {"Idempotency-Key": key or f"client-{uuid.uuid4()}"}
        return Call("POST", "/v1/jobs", _submitted, {"json": spec, "headers": headers})

    @staticmethod
    def get(job_id: str) -> Call[JobPublic]:
        return Call("GET", f"/v1/jobs/{job_id}", _model(JobPublic))

    @staticmethod
    def list(status: str | None, limit: int, after: str | None) -> Call[JobsPublic]:
        params = _page_params(status=status, limit=limit, after=after)
        return Call("GET", "/v1/jobs", _model(JobsPublic), {"params": params})

    @staticmethod
    def cancel(job_id: str) -> Call[JobPublic]:
        return Call("POST", f"/v1/jobs/{job_id}/cancel", _model(JobPublic))

    @staticmethod
    def delete(kind: str, item_id: str) -> Call[None]:
        return Call("DELETE", f"/v1/{kind}/{item_id}", _none)

    @staticmethod
    def history(job_id: str) -> Call[list[HistoryRowPublic]]:
        return Call(
            "GET",
            f"/v1/jobs/{job_id}/history",
            lambda r: HistoryPublic.model_validate(r.json()).data,
        )

    @staticmethod
    def history_csv(job_id: str) -> Call[str]:
        headers = {"Accept": "text/csv"}
        return Call("GET", f"/v1/jobs/{job_id}/history", lambda r: r.text, {"headers": headers})

    @staticmethod
    def candidates(job_id: str) -> Call[list[CandidatePublic]]:
        return Call(
            "GET",
            f"/v1/jobs/{job_id}/candidates",
            lambda r: CandidatesPublic.model_validate(r.json()).data,
        )

    @staticmethod
    def artifacts(job_id: str) -> Call[list[ArtifactPublic]]:
        return Call(
            "GET",
            f"/v1/jobs/{job_id}/artifacts",
            lambda r: ArtifactsPublic.model_validate(r.json()).data,
        )

    @staticmethod
    def datasets(limit: int, after: str | None, sha256: str | None) -> Call[DatasetsPublic]:
        params = _page_params(limit=limit, after=after, sha256=sha256)
        return Call("GET", "/v1/datasets", _model(DatasetsPublic), {"params": params})

    @staticmethod
    def models(limit: int, after: str | None, sha256: str | None) -> Call[ModelsPublic]:
        params = _page_params(limit=limit, after=after, sha256=sha256)
        return Call("GET", "/v1/models", _model(ModelsPublic), {"params": params})

    @staticmethod
    def upload(kind: str, f: IO[bytes], name: str, data: dict[str, str]) -> Call[Any]:
        model = DatasetPublic if kind == "datasets" else ModelPublic
        kwargs = {"files": {"file": (name, f)}, "data": data, "timeout": None}
        return Call("POST", f"/v1/{kind}", _model(model), kwargs)

    @staticmethod
    def create_webhook(
        url: str, events: list[str] | None, description: str
    ) -> Call[WebhookCreated]:
        fields = {"url": url, "description": description, **({"events": events} if events else {})}
        body = WebhookCreate.model_validate(fields).model_dump(mode="json")
        return Call("POST", "/v1/webhooks", _model(WebhookCreated), {"json": body})

    @staticmethod
    def webhooks() -> Call[list[WebhookPublic]]:
        return Call("GET", "/v1/webhooks", lambda r: WebhooksPublic.model_validate(r.json()).data)

    @staticmethod
    def webhook_secret() -> Call[str]:
        return Call(
            "GET",
            "/v1/webhooks/default/secret",
            lambda r: WebhookSecretPublic.model_validate(r.json()).secret,
        )

    @staticmethod
    def deliveries(path: str, limit: int, after: str | None) -> Call[DeliveriesPublic]:
        params = _page_params(limit=limit, after=after)
        return Call("GET", path, _model(DeliveriesPublic), {"params": params})


FINAL = "final"  # the name that stands for the job's final model, whichever file holds it


def _artifact_named(artifacts: list[ArtifactPublic], job_id: str, name: str) -> ArtifactPublic:
    if name == FINAL:
        artifact = next((a for a in artifacts if a.final), None)
        what = "final model (it has not succeeded)"
    else:
        artifact = next((a for a in artifacts if a.name == name), None)
        what = f"artifact {name!r}"
    if artifact is None:
        raise ApiError(404, "artifact_not_found", f"job {job_id} has no {what}")
    return artifact


def _download_target(dest: str | Path, name: str) -> tuple[Path, Path]:
    dest = Path(dest)
    target = dest / name if dest.is_dir() or str(dest).endswith("/") else dest
    target.parent.mkdir(parents=True, exist_ok=True)
    return target, target.with_name(target.name + ".part")


def _range_headers(part: Path, artifact: ArtifactPublic) -> tuple[int, dict[str, str]]:
    """Bytes already in `part`, and the headers that ask for the rest of the same file."""
    have = part.stat().st_size if part.exists() else 0
    if not have:
        return 0, {}
    return have, {"Range": f"bytes={have}-", "If-Range": f'"{artifact.sha256}"'}


def _check_download(response: httpx.Response) -> None:
    if response.status_code in RETRY_STATUS:
        raise httpx.TransportError(f"status {response.status_code}")


def _finish_download(part: Path, target: Path, artifact: ArtifactPublic) -> bool:
    if sha256_file(part) != artifact.sha256:
        return False
    os.replace(part, target)
    return True


def _in_parts(path: Path, resumable: bool | None) -> bool:
    return resumable if resumable is not None else path.stat().st_size > RESUMABLE_ABOVE


def _bucket_retry(response: httpx.Response) -> bool:
    """True for a bucket's answer worth retrying; raises PartUrlExpired for a refused URL
    (the flow asks the API for fresh ones) and ApiError for any other refusal."""
    if response.status_code < 300:
        return False
    if response.status_code == 403:
        raise PartUrlExpired(response.text[:300])
    if response.status_code in RETRY_STATUS:
        return True
    raise ApiError(response.status_code, "bucket_refused", response.text[:300])


class _Base:
    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        *,
        retries: int,
        backoff: float,
        max_retry_wait: float,
    ) -> None:
        self.url = (url or os.environ.get("DISTILLERY_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or default_key()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retries, self.backoff, self.max_retry_wait = retries, backoff, max_retry_wait

    def _retry_after(self, response: httpx.Response | None, attempt: int) -> float | None:
        """How long to wait before trying again, or None to stop: the answer stands."""
        if response is not None and response.status_code not in RETRY_STATUS:
            return None
        if attempt >= self.retries:
            return None
        return min(retry_delay(response, attempt, self.backoff), self.max_retry_wait)


class Client(_Base):
    """The synchronous client. Every method returns the API's public models."""

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
        super().__init__(
            url, api_key, retries=retries, backoff=backoff, max_retry_wait=max_retry_wait
        )
        self.http = httpx.Client(
            base_url=self.url, headers=self.headers, timeout=timeout, transport=transport
        )
        # A bucket's presigned part URLs: no base URL, and never the API key.
        self.bucket = httpx.Client(timeout=timeout, transport=transport)
        self.sleep = sleep

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()
        self.bucket.close()

    # -- transport ------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send one request, retrying what is safe to retry; raises ApiError on a 4xx/5xx."""
        retryable = _retryable(method, kw.get("headers"))
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, **kw)
            except httpx.TransportError:
                wait = self._retry_after(None, attempt) if retryable else None
                if wait is None:
                    raise
            else:
                wait = self._retry_after(response, attempt) if retryable else None
                if wait is None:
                    break
            self.sleep(wait)
            attempt += 1
        if response.status_code >= 400:
            raise api_error(response)
        return response

    def call(self, call: Call[T]) -> T:
        return call.parse(self.request(call.method, call.path, **call.kwargs))

    # -- jobs -------------------------------------------------------------------------------------

    def submit(
        self, spec: dict[str, Any] | str | Path, *, idempotency_key: str | None = None
    ) -> SubmittedJob:
        """Submit a spec (a dict, or the path of a JSON file). `replayed` on the answer says the
        service gave back the job an earlier submit with the same key made."""
        return self.call(Calls.submit(load_spec(spec), idempotency_key))

    def get(self, job_id: str) -> JobPublic:
        return self.call(Calls.get(job_id))

    def list(
        self, *, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> JobsPublic:
        return self.call(Calls.list(status, limit, after))

    def iter_jobs(self, *, status: str | None = None, page_size: int = 100) -> Iterator[JobPublic]:
        after = None
        while True:
            page = self.list(status=status, limit=page_size, after=after)
            yield from page.data
            if not page.has_more:
                return
            after = page.next_after

    def cancel(self, job_id: str) -> JobPublic:
        return self.call(Calls.cancel(job_id))

    def delete(self, job_id: str) -> None:
        """Delete a finished job and its artifacts (409 while it is queued or running)."""
        self.call(Calls.delete("jobs", job_id))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[JobPublic], None] | None = None,
    ) -> JobPublic:
        """Block until the job ends and return it; raises WaitTimeout (holding the last state
        seen) after `timeout` seconds. `on_update` sees every state polled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update is not None:
                on_update(job)
            left = _until_next_poll(job, deadline, poll, timeout)
            if left is None:
                return job
            self.sleep(left)

    def events(
        self, job_id: str, *, after: int = 0, timeout: float | None = None
    ) -> Iterator[Event]:
        """The job's server-sent events from its first (or after `after`) until it ends (the
        last is `end`), reconnecting with Last-Event-ID when the stream drops. With `timeout`,
        the iteration also stops after that many seconds, without an `end`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last, failures = after, 0
        while True:
            read = _read_timeout(deadline)
            if read is not None and read <= 0:
                return
            try:
                with connect_sse(
                    self.http,
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers={"Last-Event-ID": str(last)},
                    timeout=httpx.Timeout(read, connect=10),
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise api_error(source.response)
                    for sse in source.iter_sse():
                        event = _event(sse, last)
                        last, failures = event.id, 0
                        yield event
                        if event.type == "end" or _past(deadline):
                            return
                    raise _ended_early()  # a proxy cut it, or the server restarted: reconnect
            except httpx.ReadTimeout:
                continue  # quiet for longer than the deadline allows: check it, reconnect
            except (httpx.TransportError, SSEError):
                failures += 1
                if failures > self.retries:
                    raise
                self.sleep(self.backoff * (2 ** (failures - 1)))

    def history(self, job_id: str) -> list[HistoryRowPublic]:
        """Every epoch of every training run of the job, in the order they ran."""
        return self.call(Calls.history(job_id))

    def history_csv(self, job_id: str) -> str:
        """The same rows as CSV (the columns of history.csv)."""
        return self.call(Calls.history_csv(job_id))

    def candidates(self, job_id: str) -> list[CandidatePublic]:
        """A search job's candidates: axis values, metrics with intervals, gates, on_front."""
        return self.call(Calls.candidates(job_id))

    # -- artifacts --------------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[ArtifactPublic]:
        return self.call(Calls.artifacts(job_id))

    def download(
        self,
        job_id: str,
        name: str = FINAL,
        dest: str | Path = ".",
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download an artifact (by default the final model, under its own file name) to
        `dest` (a folder or a file path), verify its sha256, and resume from a partial
        `.part` file with a Range request if an earlier try was cut off."""
        artifact = _artifact_named(self.artifacts(job_id), job_id, name)
        target, part = _download_target(dest, artifact.name)
        for fresh in (False, True):
            if fresh:
                part.unlink(missing_ok=True)
            self._fetch(artifact, part, on_progress)
            if _finish_download(part, target, artifact):
                return target
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: sha256 does not match after a fresh download")

    def _fetch(self, artifact: ArtifactPublic, part: Path, on_progress) -> None:
        attempt = 0
        while True:
            have, headers = _range_headers(part, artifact)
            if have >= artifact.bytes:
                return
            try:
                with self.http.stream(
                    "GET",
                    artifact.url,
                    headers=headers,
                    timeout=httpx.Timeout(60, connect=10),
                    # A bucket's presigned URL: httpx drops the API key on the way there.
                    follow_redirects=True,
                ) as r:
                    _check_download(r)
                    if r.status_code >= 400:
                        r.read()
                        raise api_error(r)
                    # 206: the rest; 200: the server sent it whole.
                    done = have if r.status_code == 206 else 0
                    with open(part, "ab" if r.status_code == 206 else "wb") as f:
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

    def upload_dataset(
        self,
        path: str | Path,
        *,
        resumable: bool | None = None,
        part_bytes: int | None = None,
        on_progress: Progress | None = None,
    ) -> DatasetPublic:
        """Upload a .npz or an ImageFolder .zip/.tar.gz; it is validated and described. Files
        over 64 MiB (or `resumable=True`) go in parts: a cut connection re-sends only its part,
        and a later call for the same file resumes where an earlier one stopped."""
        path = Path(path)
        if _in_parts(path, resumable):
            return self._upload_in_parts(
                UploadPlan.of("dataset", path, {}, part_bytes), on_progress
            )
        with open(path, "rb") as f:
            return self.call(Calls.upload("datasets", f, path.name, {}))

    def upload_model(
        self,
        path: str | Path,
        *,
        format: str | None = None,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        input_shape: list[int] | tuple[int, ...] | None = None,
        num_classes: int | None = None,
        resumable: bool | None = None,
        part_bytes: int | None = None,
        on_progress: Progress | None = None,
    ) -> ModelPublic:
        """Upload a teacher: TorchScript, ONNX, or safetensors weights with `arch` (in parts
        above 64 MiB, as `upload_dataset`)."""
        path = Path(path)
        data = _model_fields(format, arch, arch_kwargs, input_shape, num_classes)
        if _in_parts(path, resumable):
            return self._upload_in_parts(
                UploadPlan.of("model", path, data, part_bytes), on_progress
            )
        with open(path, "rb") as f:
            return self.call(Calls.upload("models", f, path.name, data))

    def _upload_in_parts(self, plan: UploadPlan, on_progress: Progress | None) -> Any:
        flow = upload_flow(self.url, plan, on_progress)
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value
            reply, error = None, None
            try:
                reply = self._send_part(step) if isinstance(step, SendPart) else self.call(step)
            except (ApiError, PartUrlExpired) as e:
                error = e

    def _send_part(self, part: SendPart) -> None:
        if part.url is None:
            self.call(part_call(part))
            return
        attempt = 0
        while True:  # straight to the bucket, without the API key; retried like the API
            response = None
            try:
                response = self.bucket.put(part.url, content=part.data)
            except httpx.TransportError:
                if self._retry_after(None, attempt) is None:
                    raise
            if response is not None and not _bucket_retry(response):
                return
            wait = self._retry_after(response, attempt)
            if wait is None:
                raise api_error(response)
            self.sleep(wait)
            attempt += 1

    def datasets(
        self, *, limit: int = 20, after: str | None = None, sha256: str | None = None
    ) -> DatasetsPublic:
        """The tenant's datasets, newest first; `sha256` finds an upload of the same bytes."""
        return self.call(Calls.datasets(limit, after, sha256))

    def models(
        self, *, limit: int = 20, after: str | None = None, sha256: str | None = None
    ) -> ModelsPublic:
        return self.call(Calls.models(limit, after, sha256))

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete an upload (409 while a queued or running job uses it)."""
        self.call(Calls.delete("datasets", dataset_id))

    def delete_model(self, model_id: str) -> None:
        self.call(Calls.delete("models", model_id))

    # -- webhooks ---------------------------------------------------------------------------------

    def create_webhook(
        self, url: str, *, events: list[str] | None = None, description: str = ""
    ) -> WebhookCreated:
        """Register an endpoint for every job of the tenant; its `secret` is shown only here."""
        return self.call(Calls.create_webhook(url, events, description))

    def webhooks(self) -> list[WebhookPublic]:
        return self.call(Calls.webhooks())

    def delete_webhook(self, webhook_id: str) -> None:
        self.call(Calls.delete("webhooks", webhook_id))

    def webhook_secret(self) -> str:
        """The secret that signs the deliveries of the webhooks jobs name in their spec."""
        return self.call(Calls.webhook_secret())

    def deliveries(
        self,
        *,
        webhook_id: str | None = None,
        job_id: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> DeliveriesPublic:
        """Deliveries to an endpoint (`webhook_id`), or every delivery about a job (`job_id`),
        newest first, each with every attempt."""
        return self.call(Calls.deliveries(_deliveries_path(webhook_id, job_id), limit, after))


def _deliveries_path(webhook_id: str | None, job_id: str | None) -> str:
    if (webhook_id is None) == (job_id is None):
        raise ValueError("name exactly one of webhook_id and job_id")
    if webhook_id is not None:
        return f"/v1/webhooks/{webhook_id}/deliveries"
    return f"/v1/jobs/{job_id}/webhook-deliveries"


def _ended_early() -> httpx.TransportError:
    """The stream always ends with an `end` event: one that stops before was cut somewhere."""
    return httpx.RemoteProtocolError("the event stream ended before the job did")


def _until_next_poll(
    job: JobPublic, deadline: float | None, poll: float, timeout: float | None
) -> float | None:
    """After a poll: None when the job has ended, else how long to sleep before the next;
    WaitTimeout once the deadline has passed."""
    if job.status in TERMINAL:
        return None
    if deadline is not None and time.monotonic() >= deadline:
        raise WaitTimeout(job, timeout or 0)
    return poll if deadline is None else min(poll, max(deadline - time.monotonic(), 0.0))


def _read_timeout(deadline: float | None) -> float | None:
    """How long a stream may stay silent: the server sends a keep-alive every 15 s, so 30 s of
    silence is a dead connection; with a deadline, no longer than what is left of it."""
    if deadline is None:
        return 30.0
    return min(30.0, deadline - time.monotonic())


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


class AsyncClient(_Base):
    """The same client for asyncio: every method is a coroutine (events() an async iterator)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_retry_wait: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            url, api_key, retries=retries, backoff=backoff, max_retry_wait=max_retry_wait
        )
        self.http = httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=timeout, transport=transport
        )
        self.bucket = httpx.AsyncClient(timeout=timeout, transport=transport)
        self.sleep = sleep

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.bucket.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        retryable = _retryable(method, kw.get("headers"))
        attempt = 0
        while True:
            try:
                response = await self.http.request(method, path, **kw)
            except httpx.TransportError:
                wait = self._retry_after(None, attempt) if retryable else None
                if wait is None:
                    raise
            else:
                wait = self._retry_after(response, attempt) if retryable else None
                if wait is None:
                    break
            await self.sleep(wait)
            attempt += 1
        if response.status_code >= 400:
            raise api_error(response)
        return response

    async def call(self, call: Call[T]) -> T:
        return call.parse(await self.request(call.method, call.path, **call.kwargs))

    async def submit(
        self, spec: dict[str, Any] | str | Path, *, idempotency_key: str | None = None
    ) -> SubmittedJob:
        return await self.call(Calls.submit(load_spec(spec), idempotency_key))

    async def get(self, job_id: str) -> JobPublic:
        return await self.call(Calls.get(job_id))

    async def list(
        self, *, status: str | None = None, limit: int = 20, after: str | None = None
    ) -> JobsPublic:
        return await self.call(Calls.list(status, limit, after))

    async def cancel(self, job_id: str) -> JobPublic:
        return await self.call(Calls.cancel(job_id))

    async def delete(self, job_id: str) -> None:
        await self.call(Calls.delete("jobs", job_id))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[JobPublic], None] | None = None,
    ) -> JobPublic:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if on_update is not None:
                on_update(job)
            left = _until_next_poll(job, deadline, poll, timeout)
            if left is None:
                return job
            await self.sleep(left)

    async def events(
        self, job_id: str, *, after: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        last, failures = after, 0
        while True:
            read = _read_timeout(deadline)
            if read is not None and read <= 0:
                return
            try:
                async with aconnect_sse(
                    self.http,
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    headers={"Last-Event-ID": str(last)},
                    timeout=httpx.Timeout(read, connect=10),
                ) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        raise api_error(source.response)
                    async for sse in source.aiter_sse():
                        event = _event(sse, last)
                        last, failures = event.id, 0
                        yield event
                        if event.type == "end" or _past(deadline):
                            return
                    raise _ended_early()
            except httpx.ReadTimeout:
                continue
            except (httpx.TransportError, SSEError):
                failures += 1
                if failures > self.retries:
                    raise
                await self.sleep(self.backoff * (2 ** (failures - 1)))

    async def history(self, job_id: str) -> list[HistoryRowPublic]:
        return await self.call(Calls.history(job_id))

    async def candidates(self, job_id: str) -> list[CandidatePublic]:
        return await self.call(Calls.candidates(job_id))

    async def artifacts(self, job_id: str) -> list[ArtifactPublic]:
        return await self.call(Calls.artifacts(job_id))

    async def download(self, job_id: str, name: str = FINAL, dest: str | Path = ".") -> Path:
        artifact = _artifact_named(await self.artifacts(job_id), job_id, name)
        target, part = _download_target(dest, artifact.name)
        for fresh in (False, True):
            if fresh:
                part.unlink(missing_ok=True)
            await self._fetch(artifact, part)
            if _finish_download(part, target, artifact):
                return target
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: sha256 does not match after a fresh download")

    async def _fetch(self, artifact: ArtifactPublic, part: Path) -> None:
        attempt = 0
        while True:
            have, headers = _range_headers(part, artifact)
            if have >= artifact.bytes:
                return
            try:
                async with self.http.stream(
                    "GET",
                    artifact.url,
                    headers=headers,
                    timeout=httpx.Timeout(60, connect=10),
                    # A bucket's presigned URL: httpx drops the API key on the way there.
                    follow_redirects=True,
                ) as r:
                    _check_download(r)
                    if r.status_code >= 400:
                        await r.aread()
                        raise api_error(r)
                    with open(part, "ab" if r.status_code == 206 else "wb") as f:
                        async for chunk in r.aiter_bytes(1 << 20):
                            f.write(chunk)
                return
            except httpx.TransportError:
                attempt += 1
                if attempt > self.retries:
                    raise
                await self.sleep(self.backoff * (2 ** (attempt - 1)))

    async def upload_dataset(
        self,
        path: str | Path,
        *,
        resumable: bool | None = None,
        part_bytes: int | None = None,
        on_progress: Progress | None = None,
    ) -> DatasetPublic:
        path = Path(path)
        if _in_parts(path, resumable):
            plan = UploadPlan.of("dataset", path, {}, part_bytes)
            return await self._upload_in_parts(plan, on_progress)
        with open(path, "rb") as f:
            return await self.call(Calls.upload("datasets", f, path.name, {}))

    async def upload_model(
        self,
        path: str | Path,
        *,
        format: str | None = None,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        input_shape: list[int] | tuple[int, ...] | None = None,
        num_classes: int | None = None,
        resumable: bool | None = None,
        part_bytes: int | None = None,
        on_progress: Progress | None = None,
    ) -> ModelPublic:
        path = Path(path)
        data = _model_fields(format, arch, arch_kwargs, input_shape, num_classes)
        if _in_parts(path, resumable):
            plan = UploadPlan.of("model", path, data, part_bytes)
            return await self._upload_in_parts(plan, on_progress)
        with open(path, "rb") as f:
            return await self.call(Calls.upload("models", f, path.name, data))

    async def _upload_in_parts(self, plan: UploadPlan, on_progress: Progress | None) -> Any:
        flow = upload_flow(self.url, plan, on_progress)
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(reply)
            except StopIteration as stop:
                return stop.value
            reply, error = None, None
            try:
                if isinstance(step, SendPart):
                    reply = await self._send_part(step)
                else:
                    reply = await self.call(step)
            except (ApiError, PartUrlExpired) as e:
                error = e

    async def _send_part(self, part: SendPart) -> None:
        if part.url is None:
            await self.call(part_call(part))
            return
        attempt = 0
        while True:
            response = None
            try:
                response = await self.bucket.put(part.url, content=part.data)
            except httpx.TransportError:
                if self._retry_after(None, attempt) is None:
                    raise
            if response is not None and not _bucket_retry(response):
                return
            wait = self._retry_after(response, attempt)
            if wait is None:
                raise api_error(response)
            await self.sleep(wait)
            attempt += 1

    async def datasets(
        self, *, limit: int = 20, after: str | None = None, sha256: str | None = None
    ) -> DatasetsPublic:
        return await self.call(Calls.datasets(limit, after, sha256))

    async def models(
        self, *, limit: int = 20, after: str | None = None, sha256: str | None = None
    ) -> ModelsPublic:
        return await self.call(Calls.models(limit, after, sha256))

    async def delete_dataset(self, dataset_id: str) -> None:
        await self.call(Calls.delete("datasets", dataset_id))

    async def delete_model(self, model_id: str) -> None:
        await self.call(Calls.delete("models", model_id))

    async def create_webhook(
        self, url: str, *, events: list[str] | None = None, description: str = ""
    ) -> WebhookCreated:
        return await self.call(Calls.create_webhook(url, events, description))

    async def webhooks(self) -> list[WebhookPublic]:
        return await self.call(Calls.webhooks())

    async def delete_webhook(self, webhook_id: str) -> None:
        await self.call(Calls.delete("webhooks", webhook_id))

    async def webhook_secret(self) -> str:
        return await self.call(Calls.webhook_secret())

    async def deliveries(
        self,
        *,
        webhook_id: str | None = None,
        job_id: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> DeliveriesPublic:
        return await self.call(Calls.deliveries(_deliveries_path(webhook_id, job_id), limit, after))
