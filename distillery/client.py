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

Both clients are thin shells over one sans-IO core (distillery.core): every method is a flow
there, and a shell only performs the I/O steps it yields, with httpx's sync or async client.
The two expose the same methods (tests/distillery/test_client_parity.py checks it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import aconnect_sse, connect_sse

from distillery import core
from distillery.calls import ApiError, Call, Calls, api_error, deliveries_path, model_fields
from distillery.core import (
    CHUNK,
    DEFAULT_URL,
    FINAL,
    DownloadError,
    Emit,
    Event,
    Fetch,
    Flow,
    Listen,
    Send,
    Steps,
    WaitTimeout,
    default_key,
    load_spec,
    retry_delay,
)
from distillery.resumable import Progress, sha256_file
from distillery.schemas import (
    ArtifactPublic,
    CandidatePublic,
    DatasetPublic,
    DatasetsPublic,
    DeliveriesPublic,
    HistoryRowPublic,
    JobPublic,
    JobsPublic,
    ModelPublic,
    ModelsPublic,
    SubmittedJob,
    WebhookCreated,
    WebhookPublic,
)

__all__ = [
    "DEFAULT_URL",
    "FINAL",
    "ApiError",
    "AsyncClient",
    "Client",
    "DownloadError",
    "Event",
    "WaitTimeout",
    "api_error",
    "default_key",
    "retry_delay",
    "sha256_file",
]
T = TypeVar("T")


class Client(core.BaseClient):
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

    # -- the shell: perform the core's steps ------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        steps = Steps(flow)
        for _ in self._drive(steps):
            pass
        return steps.result

    def _drive(self, steps: Steps[Any]) -> Iterator[Any]:
        for step in steps:
            try:
                if isinstance(step, Emit):
                    yield step.value
                elif isinstance(step, Listen):
                    yield from self._listen(step)
                else:
                    steps.answer(self._perform(step))
            except Exception as e:  # the flow decides: retry, resume, or let it through
                steps.fail(e)

    def _perform(self, step: Send | core.Sleep | Fetch) -> Any:
        if isinstance(step, Send):
            http = self.bucket if step.bucket else self.http
            return http.request(step.method, step.url, **step.kwargs)
        if isinstance(step, core.Sleep):
            return self.sleep(step.seconds)
        with self.http.stream("GET", step.url, **step.kwargs) as r:
            if r.status_code >= 400:
                r.read()
            with step.receive(r) as write:
                for chunk in r.iter_bytes(CHUNK):
                    write(chunk)

    def _listen(self, step: Listen) -> Iterator[Event]:
        with connect_sse(self.http, "GET", step.path, **step.kwargs) as source:
            if source.response.status_code >= 400:
                source.response.read()
            step.opened(source.response)
            for sse in source.iter_sse():
                yield step.received(sse)
                if step.done:
                    return

    # -- requests ---------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send one request, retrying what is safe to retry; raises ApiError on a 4xx/5xx."""
        return self._run(core.request(self.retry, Send(method, path, kw)))

    def call(self, call: Call[T]) -> T:
        """Send one request built by distillery.calls and read its answer."""
        return self._run(core.call(self.retry, call))

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
        """One page of the tenant's jobs, newest first (`next_after` asks for the next)."""
        return self.call(Calls.list(status, limit, after))

    def iter_jobs(self, *, status: str | None = None, page_size: int = 100) -> Iterator[JobPublic]:
        """Every job of the tenant (with `status`, those in it), page after page."""
        yield from self._drive(Steps(core.iter_jobs(self.retry, status, page_size)))

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
        return self._run(core.wait(self.retry, job_id, timeout, poll, on_update))

    def events(
        self, job_id: str, *, after: int = 0, timeout: float | None = None
    ) -> Iterator[Event]:
        """The job's server-sent events from its first (or after `after`) until it ends (the
        last is `end`), reconnecting with Last-Event-ID when the stream drops. With `timeout`,
        the iteration also stops after that many seconds, without an `end`."""
        yield from self._drive(Steps(core.events(self.retry, job_id, after, timeout)))

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
        on_progress: Progress | None = None,
    ) -> Path:
        """Download an artifact (by default the final model, under its own file name) to
        `dest` (a folder or a file path), verify its sha256, and resume from a partial
        `.part` file with a Range request if an earlier try was cut off. `on_progress` sees
        (bytes in the file, bytes in all) after each MiB."""
        return self._run(core.download(self.retry, job_id, name, dest, on_progress))

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
        flow = core.upload(
            self.retry, self.url, "dataset", path, {}, resumable, part_bytes, on_progress
        )
        return self._run(flow)

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
        fields = model_fields(format, arch, arch_kwargs, input_shape, num_classes)
        flow = core.upload(
            self.retry, self.url, "model", path, fields, resumable, part_bytes, on_progress
        )
        return self._run(flow)

    def datasets(
        self, *, limit: int = 20, after: str | None = None, sha256: str | None = None
    ) -> DatasetsPublic:
        """The tenant's datasets, newest first; `sha256` finds an upload of the same bytes."""
        return self.call(Calls.datasets(limit, after, sha256))

    def models(
        self, *, limit: int = 20, after: str | None = None, sha256: str | None = None
    ) -> ModelsPublic:
        """The tenant's teachers, newest first; `sha256` finds an upload of the same bytes."""
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
        return self.call(Calls.deliveries(deliveries_path(webhook_id, job_id), limit, after))


class AsyncClient(core.BaseClient):
    """The same client for asyncio: every method is the coroutine of `Client`'s method of the
    same name (`events` and `iter_jobs` async iterators; `aclose` for `close`)."""

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

    async def _run(self, flow: Flow[T]) -> T:
        steps = Steps(flow)
        async for _ in self._drive(steps):
            pass
        return steps.result

    async def _drive(self, steps: Steps[Any]) -> AsyncIterator[Any]:
        for step in steps:
            try:
                if isinstance(step, Emit):
                    yield step.value
                elif isinstance(step, Listen):
                    async for event in self._listen(step):
                        yield event
                else:
                    steps.answer(await self._perform(step))
            except Exception as e:
                steps.fail(e)

    async def _perform(self, step: Send | core.Sleep | Fetch) -> Any:
        if isinstance(step, Send):
            http = self.bucket if step.bucket else self.http
            return await http.request(step.method, step.url, **step.kwargs)
        if isinstance(step, core.Sleep):
            return await self.sleep(step.seconds)
        async with self.http.stream("GET", step.url, **step.kwargs) as r:
            if r.status_code >= 400:
                await r.aread()
            with step.receive(r) as write:
                async for chunk in r.aiter_bytes(CHUNK):
                    write(chunk)

    async def _listen(self, step: Listen) -> AsyncIterator[Event]:
        async with aconnect_sse(self.http, "GET", step.path, **step.kwargs) as source:
            if source.response.status_code >= 400:
                await source.response.aread()
            step.opened(source.response)
            async for sse in source.aiter_sse():
                yield step.received(sse)
                if step.done:
                    return

    async def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self._run(core.request(self.retry, Send(method, path, kw)))

    async def call(self, call: Call[T]) -> T:
        return await self._run(core.call(self.retry, call))

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

    async def iter_jobs(
        self, *, status: str | None = None, page_size: int = 100
    ) -> AsyncIterator[JobPublic]:
        async for job in self._drive(Steps(core.iter_jobs(self.retry, status, page_size))):
            yield job

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
        return await self._run(core.wait(self.retry, job_id, timeout, poll, on_update))

    async def events(
        self, job_id: str, *, after: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        async for event in self._drive(Steps(core.events(self.retry, job_id, after, timeout))):
            yield event

    async def history(self, job_id: str) -> list[HistoryRowPublic]:
        return await self.call(Calls.history(job_id))

    async def history_csv(self, job_id: str) -> str:
        return await self.call(Calls.history_csv(job_id))

    async def candidates(self, job_id: str) -> list[CandidatePublic]:
        return await self.call(Calls.candidates(job_id))

    async def artifacts(self, job_id: str) -> list[ArtifactPublic]:
        return await self.call(Calls.artifacts(job_id))

    async def download(
        self,
        job_id: str,
        name: str = FINAL,
        dest: str | Path = ".",
        *,
        on_progress: Progress | None = None,
    ) -> Path:
        return await self._run(core.download(self.retry, job_id, name, dest, on_progress))

    async def upload_dataset(
        self,
        path: str | Path,
        *,
        resumable: bool | None = None,
        part_bytes: int | None = None,
        on_progress: Progress | None = None,
    ) -> DatasetPublic:
        flow = core.upload(
            self.retry, self.url, "dataset", path, {}, resumable, part_bytes, on_progress
        )
        return await self._run(flow)

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
        fields = model_fields(format, arch, arch_kwargs, input_shape, num_classes)
        flow = core.upload(
            self.retry, self.url, "model", path, fields, resumable, part_bytes, on_progress
        )
        return await self._run(flow)

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
        return await self.call(Calls.deliveries(deliveries_path(webhook_id, job_id), limit, after))


def _share_docs(shell: type, documented: type) -> None:
    """One text for each method, written on Client's: `help(AsyncClient.download)` shows it."""
    for name, method in vars(shell).items():
        if not name.startswith("_") and method.__doc__ is None and hasattr(documented, name):
            method.__doc__ = getattr(documented, name).__doc__


_share_docs(AsyncClient, Client)
