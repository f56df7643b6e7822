"""Errors as types; one handler renders them all as {"error": {"code", "message"}}."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel

from distillery_contract.errors import DistilleryError, ErrorCode

# An absolute POSIX path: a "/" that starts a word (not inside "a/b", "../x" or a URL's "//"),
# then one or more components. Quotes, brackets, commas and colons end it, as they end the
# paths that OS and library errors quote.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:-])(?:/[^\s'\"`,;:()\[\]{}<>/]+)+/?")


def public_message(message: str) -> str:
    """`message` with every absolute path cut to its last component, for a client to read.

    Errors quote OS and library messages, and those name files on the server (`[Errno 17]
    File exists: '/srv/storage/jobs/…'`): the storage layout and home folder are not the
    client's business, and the last component is the part a user can recognise."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class AppError(DistilleryError):
    """An error the API answers with: its HTTP status, its code, and headers to send."""

    status_code: ClassVar[int] = 400
    code: ClassVar[ErrorCode] = ErrorCode.BAD_REQUEST

    def __init__(
        self, message: str, *, code: ErrorCode | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class Unauthorized(AppError):
    status_code, code = 401, ErrorCode.UNAUTHORIZED


class NotFound(AppError):
    status_code, code = 404, ErrorCode.NOT_FOUND


class MetricsDisabled(NotFound):
    code = ErrorCode.METRICS_DISABLED


class JobNotFound(NotFound):
    code = ErrorCode.JOB_NOT_FOUND


class ArtifactNotFound(NotFound):
    code = ErrorCode.ARTIFACT_NOT_FOUND


class DatasetNotFound(NotFound):
    code = ErrorCode.DATASET_NOT_FOUND


class ModelNotFound(NotFound):
    code = ErrorCode.MODEL_NOT_FOUND


class WebhookNotFound(NotFound):
    code = ErrorCode.WEBHOOK_NOT_FOUND


class ArtifactsExpired(AppError):
    """The job's files were deleted for age (ARTIFACT_TTL_DAYS); its record stays."""

    status_code, code = 410, ErrorCode.ARTIFACTS_EXPIRED


class JobStateConflict(AppError):
    status_code, code = 409, ErrorCode.JOB_STATE_CONFLICT


class UploadInUse(AppError):
    status_code, code = 409, ErrorCode.UPLOAD_IN_USE


class IdempotencyConflict(AppError):
    status_code, code = 409, ErrorCode.IDEMPOTENCY_KEY_REUSED


class PayloadTooLarge(AppError):
    status_code, code = 413, ErrorCode.PAYLOAD_TOO_LARGE


class QuotaExceeded(AppError):
    """The tenant is over one of its quotas (TENANT_MAX_*); Retry-After says when to retry."""

    status_code, code = 429, ErrorCode.QUOTA_EXCEEDED


class Overloaded(AppError):
    """The API could not get a database connection in time (DB_POOL_TIMEOUT_SECONDS)."""

    status_code, code = 503, ErrorCode.OVERLOADED


class UploadTimeout(AppError):
    """A client sent nothing for UPLOAD_READ_TIMEOUT_SECONDS in the middle of a body."""

    status_code, code = 408, ErrorCode.UPLOAD_TIMEOUT


class InsufficientStorage(AppError):
    """The API's disk cannot hold the file: refused before a byte of it is written."""

    status_code, code = 507, ErrorCode.INSUFFICIENT_STORAGE


class UploadNotFound(NotFound):
    code = ErrorCode.UPLOAD_NOT_FOUND


class UploadStateConflict(AppError):
    status_code, code = 409, ErrorCode.UPLOAD_STATE_CONFLICT


class StorageUnavailable(AppError):
    """The store (an S3 bucket) did not answer or refused; nothing was written."""

    status_code, code = 503, ErrorCode.STORAGE_UNAVAILABLE


class SpecInvalid(AppError):
    status_code, code = 422, ErrorCode.INVALID_SPEC


class WebhookInvalid(AppError):
    status_code, code = 422, ErrorCode.INVALID_WEBHOOK


class UploadInvalid(AppError):
    status_code, code = 422, ErrorCode.INVALID_UPLOAD

    def __init__(self, message: str, **kwargs: Any) -> None:
        # Refusals quote parser and OS errors about the upload's temporary file on the server.
        super().__init__(public_message(message), **kwargs)


def error_responses(*errors: type[AppError]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route, so the OpenAPI document lists the errors it can return."""
    out: dict[int | str, dict[str, Any]] = {}
    for err in errors:
        entry = out.setdefault(err.status_code, {"model": ErrorBody, "description": ""})
        entry["description"] = ", ".join(filter(None, [entry["description"], f"`{err.code}`"]))
    return out
