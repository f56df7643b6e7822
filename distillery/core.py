"""The client's sans-IO core: all that `Client` and `AsyncClient` do, written once.

Each method of the client is a *flow*: a generator that yields the I/O it needs as steps
(`Send` a request, `Sleep`, `Fetch` a download into its `.part` file, `Listen` to an event
stream, `Emit` a value to the caller) and receives each step's answer, or its exception, back.
Request building (distillery.calls), retry and backoff, resuming (Last-Event-ID, Range, an
upload's parts), error mapping and SSE parsing all live here; the two shells in
distillery.client only perform the steps, one with httpx.Client and time.sleep, the other with
httpx.AsyncClient and asyncio.sleep, as httpx's BaseClient holds what its two clients share.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from httpx_sse import ServerSentEvent, SSEError

from distillery.calls import ApiError, Call, Calls, api_error
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
from distillery.schemas import ArtifactPublic, JobPublic
from distillery.states import TERMINAL

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUS = frozenset({429, 502, 503, 504})
# DELETE: a second one finds nothing to do; PUT (a part of an upload): sent again, it replaces
# itself.
SAFE_METHODS = frozenset({"GET", "HEAD", "DELETE", "PUT"})
FINAL = "final"  # the name that stands for the job's final model, whichever file holds it
CHUNK = 1 << 20  # a download's bytes are written (and reported) a MiB at a time
T = TypeVar("T")


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


def load_spec(spec: dict[str, Any] | str | Path) -> dict[str, Any]:
    return json.loads(Path(spec).read_text()) if isinstance(spec, str | Path) else spec


# --- the steps: the I/O a flow asks its shell for ----------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send one request; the answer is its httpx.Response (a TransportError is thrown back)."""

    method: str
    url: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    bucket: bool = False  # a bucket's presigned URL: no base URL, and never the API key


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Emit:
    """Hand `value` to whoever iterates the method (iter_jobs); no answer."""

    value: Any


@dataclass(frozen=True)
class Fetch:
    """Stream GET `url` into `part`: the shell opens the stream (reading the body of an error),
    hands the response to `receive` and each chunk of the body to the writer it gives back."""

    url: str
    headers: dict[str, str]
    part: Path
    have: int  # bytes already in `part`, asked for again only if the server ignores Range
    total: int
    on_progress: Progress | None

    @property
    def kwargs(self) -> dict[str, Any]:
        # A bucket's presigned URL: httpx drops the API key on the way there.
        timeout = httpx.Timeout(60, connect=10)
        return {"headers": self.headers, "timeout": timeout, "follow_redirects": True}

    @contextmanager
    def receive(self, response: httpx.Response) -> Iterator[Callable[[bytes], None]]:
        if response.status_code in RETRY_STATUS:
            raise httpx.TransportError(f"status {response.status_code}")
        if response.status_code >= 400:
            raise api_error(response)
        # 206: the rest; 200: the server sent it whole.
        done = self.have if response.status_code == 206 else 0
        with open(self.part, "ab" if response.status_code == 206 else "wb") as f:

            def write(chunk: bytes) -> None:
                nonlocal done
                f.write(chunk)
                done += len(chunk)
                if self.on_progress is not None:
                    self.on_progress(done, self.total)

            yield write


@dataclass
class Listen:
    """Read a job's event stream after event `last`: the shell opens it, hands the response to
    `opened`, gives the caller what `received` makes of each server-sent event, and stops once
    `done`. The answer is None; the flow reads `last` and `seen` back."""

    path: str
    last: int
    deadline: float | None
    read_timeout: float | None
    seen: bool = False  # an event came on this connection
    ended: bool = False  # the `end` event came

    @property
    def kwargs(self) -> dict[str, Any]:
        return {
            "headers": {"Last-Event-ID": str(self.last)},
            "timeout": httpx.Timeout(self.read_timeout, connect=10),
        }

    def opened(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise api_error(response)

    def received(self, sse: ServerSentEvent) -> Event:
        event = Event(int(sse.id) if sse.id else self.last, sse.event, json.loads(sse.data or "{}"))
        self.last, self.seen, self.ended = event.id, True, event.type == "end"
        return event

    @property
    def done(self) -> bool:
        return self.ended or _past(self.deadline)


Step = Send | Sleep | Emit | Fetch | Listen
Flow = Generator[Step, Any, T]


class Steps(Generic[T]):
    """Steps a flow for a shell: iterate to get each step, then `answer` it or `fail` it with
    the exception it raised (which the flow handles or lets through); `result` is what the
    flow returned once the iteration ends."""

    def __init__(self, flow: Flow[T]) -> None:
        self.flow = flow
        self.result: T | None = None
        self._answer: Any = None
        self._error: Exception | None = None

    def __iter__(self) -> Iterator[Step]:
        while True:
            answer, error, self._answer, self._error = self._answer, self._error, None, None
            try:
                step = self.flow.throw(error) if error is not None else self.flow.send(answer)
            except StopIteration as stop:
                self.result = stop.value
                return
            yield step

    def answer(self, answer: Any) -> None:
        self._answer = answer

    def fail(self, error: Exception) -> None:
        self._error = error


# --- retry and backoff -----------------------------------------------------------------------


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


@dataclass(frozen=True)
class Retry:
    retries: int
    backoff: float
    max_retry_wait: float

    def after(self, response: httpx.Response | None, attempt: int) -> float | None:
        """How long to wait before trying again, or None to stop: the answer stands."""
        if response is not None and response.status_code not in RETRY_STATUS:
            return None
        if attempt >= self.retries:
            return None
        return min(retry_delay(response, attempt, self.backoff), self.max_retry_wait)

    def backoff_after(self, failures: int) -> float:
        return self.backoff * (2 ** (failures - 1))


def request(
    retry: Retry, send: Send, refused: Callable[[httpx.Response], Exception] = api_error
) -> Flow[httpx.Response]:
    """Send one request, retrying what is safe to retry: connection errors and 429/502/503/504
    (honouring Retry-After) for GETs, DELETEs, PUTs and POSTs that carry an Idempotency-Key,
    never other POSTs. Raises `refused(response)` (ApiError) on a 4xx/5xx."""
    retryable = send.method in SAFE_METHODS or "Idempotency-Key" in (
        send.kwargs.get("headers") or {}
    )
    attempt = 0
    while True:
        try:
            response = yield send
        except httpx.TransportError:
            wait = retry.after(None, attempt) if retryable else None
            if wait is None:
                raise
        else:
            wait = retry.after(response, attempt) if retryable else None
            if wait is None:
                break
        yield Sleep(wait)
        attempt += 1
    if response.status_code >= 400:
        raise refused(response)
    return response


def call(retry: Retry, call: Call[T]) -> Flow[T]:
    return call.parse((yield from request(retry, Send(call.method, call.path, call.kwargs))))


# --- jobs --------------------------------------------------------------------------------------


def iter_jobs(retry: Retry, status: str | None, page_size: int) -> Flow[None]:
    after = None
    while True:
        page = yield from call(retry, Calls.list(status, page_size, after))
        for job in page.data:
            yield Emit(job)
        if not page.has_more:
            return
        after = page.next_after


def wait(
    retry: Retry,
    job_id: str,
    timeout: float | None,
    poll: float,
    on_update: Callable[[JobPublic], None] | None,
) -> Flow[JobPublic]:
    deadline = _deadline(timeout)
    while True:
        job = yield from call(retry, Calls.get(job_id))
        if on_update is not None:
            on_update(job)
        left = _until_next_poll(job, deadline, poll, timeout)
        if left is None:
            return job
        yield Sleep(left)


def events(retry: Retry, job_id: str, after: int, timeout: float | None) -> Flow[None]:
    """Listen until the `end` event (or the deadline), reconnecting after the last event seen
    when the stream drops; `retry.retries` failures in a row without an event give up."""
    deadline = _deadline(timeout)
    last, failures = after, 0
    while True:
        read = _read_timeout(deadline)
        if read is not None and read <= 0:
            return
        listen = Listen(f"/v1/jobs/{job_id}/events", last, deadline, read)
        error: Exception | None = None
        try:
            yield listen
            if listen.done:
                return
            error = _ended_early()  # a proxy cut it, or the server restarted: reconnect
        except httpx.ReadTimeout:
            pass  # quiet for longer than the deadline allows: check it, reconnect
        except (httpx.TransportError, SSEError) as e:
            error = e
        last = listen.last
        if listen.seen:
            failures = 0
        if error is not None:
            failures += 1
            if failures > retry.retries:
                raise error
            yield Sleep(retry.backoff_after(failures))


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


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


# --- downloads ---------------------------------------------------------------------------------


def download(
    retry: Retry, job_id: str, name: str, dest: str | Path, on_progress: Progress | None
) -> Flow[Path]:
    artifact = _artifact_named((yield from call(retry, Calls.artifacts(job_id))), job_id, name)
    target, part = _download_target(dest, artifact.name)
    for fresh in (False, True):
        if fresh:
            part.unlink(missing_ok=True)
        yield from _fetch(retry, artifact, part, on_progress)
        if sha256_file(part) == artifact.sha256:
            os.replace(part, target)
            return target
    part.unlink(missing_ok=True)
    raise DownloadError(f"{name}: sha256 does not match after a fresh download")


def _fetch(
    retry: Retry, artifact: ArtifactPublic, part: Path, on_progress: Progress | None
) -> Flow[None]:
    """Fetch what `part` lacks, asking for the rest of the same file (Range, If-Range) after a
    cut; a connection error or a 429/502/503/504 is retried with backoff."""
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have >= artifact.bytes:
            return
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{artifact.sha256}"'} if have else {}
        try:
            yield Fetch(artifact.url, headers, part, have, artifact.bytes, on_progress)
            return
        except httpx.TransportError:
            attempt += 1
            if attempt > retry.retries:
                raise
            yield Sleep(retry.backoff_after(attempt))


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


# --- uploads -----------------------------------------------------------------------------------


def upload(
    retry: Retry,
    server: str,
    kind: str,
    path: str | Path,
    fields: dict[str, str],
    resumable: bool | None,
    part_bytes: int | None,
    on_progress: Progress | None,
) -> Flow[Any]:
    """Upload a dataset or a model (`kind`) in one request, or in parts when it is large (or
    `resumable`); returns its DatasetPublic or ModelPublic."""
    path = Path(path)
    if resumable if resumable is not None else path.stat().st_size > RESUMABLE_ABOVE:
        plan = UploadPlan.of(kind, path, fields, part_bytes)
        send, put = partial(call, retry), partial(_put_part, retry)
        return (yield from upload_flow(server, plan, on_progress, call=send, put=put))
    with open(path, "rb") as f:
        return (yield from call(retry, Calls.upload(f"{kind}s", f, path.name, fields)))


def _put_part(retry: Retry, part: SendPart) -> Flow[Any]:
    if part.url is None:
        return (yield from call(retry, part_call(part)))
    # Straight to the bucket, without the API key; retried like the API.
    send = Send("PUT", part.url, {"content": part.data}, bucket=True)
    return (yield from request(retry, send, refused=_bucket_refusal))


def _bucket_refusal(response: httpx.Response) -> Exception:
    """A refused presigned URL (expired): the flow asks the API for fresh ones."""
    if response.status_code == 403:
        return PartUrlExpired(response.text[:300])
    return ApiError(response.status_code, "bucket_refused", response.text[:300])


# --- what both shells hold ---------------------------------------------------------------------


class BaseClient:
    """The API's URL, the key's header and the retry policy, as both clients hold them."""

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

    @property
    def retry(self) -> Retry:
        return Retry(self.retries, self.backoff, self.max_retry_wait)
