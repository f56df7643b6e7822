"""Every request of the API as data (`Call`): built once, here, and sent by the sync or the
async client; and the API's error body read as an exception (`api_error`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

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

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """The API answered with an error: `status`, `code` (e.g. invalid_spec) and `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def api_error(response: httpx.Response) -> ApiError:
    """The `{"error": {"code", "message"}}` body as an exception (any other body, quoted)."""
    try:
        err = response.json()["error"]
        return ApiError(response.status_code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "http_error", response.text[:500])


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how to read its answer; each client only sends it."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_model(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: model.model_validate(r.json())


def parse_data(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    """The items of a `{"data": [...]}` answer (HistoryPublic, ArtifactsPublic, ...)."""
    return lambda r: model.model_validate(r.json()).data


def _none(_: httpx.Response) -> None:
    return None


def _page_params(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _submitted(r: httpx.Response) -> SubmittedJob:
    job = SubmittedJob.model_validate(r.json())
    job.replayed = r.headers.get("Idempotent-Replayed", "").lower() == "true"
    return job


def model_fields(
    format: str | None,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    input_shape: list[int] | tuple[int, ...] | None,
    num_classes: int | None,
) -> dict[str, str]:
    """A teacher upload's form fields (those given)."""
    fields = {
        "format": format,
        "arch": arch,
        "arch_kwargs": json.dumps(arch_kwargs) if arch_kwargs else None,
        "input_shape": ",".join(str(d) for d in input_shape) if input_shape else None,
        "num_classes": str(num_classes) if num_classes else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def deliveries_path(webhook_id: str | None, job_id: str | None) -> str:
    if (webhook_id is None) == (job_id is None):
        raise ValueError("name exactly one of webhook_id and job_id")
    if webhook_id is not None:
        return f"/v1/webhooks/{webhook_id}/deliveries"
    return f"/v1/jobs/{job_id}/webhook-deliveries"


class Calls:
    """Every request of the API, as data."""

    @staticmethod
    def submit(spec: dict[str, Any], key: str | None) -> Call[SubmittedJob]:
        # A fresh key unless one is given: a retried submit never makes a second job.
        headers = {"Idempotency-Key": key or f"client-{uuid.uuid4()}"}
        return Call("POST", "/v1/jobs", _submitted, {"json": spec, "headers": headers})

    @staticmethod
    def get(job_id: str) -> Call[JobPublic]:
        return Call("GET", f"/v1/jobs/{job_id}", parse_model(JobPublic))

    @staticmethod
    def list(status: str | None, limit: int, after: str | None) -> Call[JobsPublic]:
        params = _page_params(status=status, limit=limit, after=after)
        return Call("GET", "/v1/jobs", parse_model(JobsPublic), {"params": params})

    @staticmethod
    def cancel(job_id: str) -> Call[JobPublic]:
        return Call("POST", f"/v1/jobs/{job_id}/cancel", parse_model(JobPublic))

    @staticmethod
    def delete(kind: str, item_id: str) -> Call[None]:
        return Call("DELETE", f"/v1/{kind}/{item_id}", _none)

    @staticmethod
    def history(job_id: str) -> Call[list[HistoryRowPublic]]:
        return Call("GET", f"/v1/jobs/{job_id}/history", parse_data(HistoryPublic))

    @staticmethod
    def history_csv(job_id: str) -> Call[str]:
        headers = {"Accept": "text/csv"}
        return Call("GET", f"/v1/jobs/{job_id}/history", lambda r: r.text, {"headers": headers})

    @staticmethod
    def candidates(job_id: str) -> Call[list[CandidatePublic]]:
        return Call("GET", f"/v1/jobs/{job_id}/candidates", parse_data(CandidatesPublic))

    @staticmethod
    def artifacts(job_id: str) -> Call[list[ArtifactPublic]]:
        return Call("GET", f"/v1/jobs/{job_id}/artifacts", parse_data(ArtifactsPublic))

    @staticmethod
    def datasets(limit: int, after: str | None, sha256: str | None) -> Call[DatasetsPublic]:
        params = _page_params(limit=limit, after=after, sha256=sha256)
        return Call("GET", "/v1/datasets", parse_model(DatasetsPublic), {"params": params})

    @staticmethod
    def models(limit: int, after: str | None, sha256: str | None) -> Call[ModelsPublic]:
        params = _page_params(limit=limit, after=after, sha256=sha256)
        return Call("GET", "/v1/models", parse_model(ModelsPublic), {"params": params})

    @staticmethod
    def upload(kind: str, f: IO[bytes], name: str, data: dict[str, str]) -> Call[Any]:
        model = DatasetPublic if kind == "datasets" else ModelPublic
        kwargs = {"files": {"file": (name, f)}, "data": data, "timeout": None}
        return Call("POST", f"/v1/{kind}", parse_model(model), kwargs)

    @staticmethod
    def create_webhook(
        url: str, events: list[str] | None, description: str
    ) -> Call[WebhookCreated]:
        fields = {"url": url, "description": description, **({"events": events} if events else {})}
        body = WebhookCreate.model_validate(fields).model_dump(mode="json")
        return Call("POST", "/v1/webhooks", parse_model(WebhookCreated), {"json": body})

    @staticmethod
    def webhooks() -> Call[list[WebhookPublic]]:
        return Call("GET", "/v1/webhooks", parse_data(WebhooksPublic))

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
        return Call("GET", path, parse_model(DeliveriesPublic), {"params": params})
