"""Every `error.code` a client can branch on, and the error base both halves raise.

The API answers `{"error": {"code", "message"}}` with one of these; a failed or cancelled
job's `error.code` is one of the job codes. The API's errors (app.core.errors.AppError) and
the pipeline's (worker.pipeline.errors.PipelineError) both derive from `DistilleryError`, so
a code such as `invalid_spec` has one spelling whichever side finds the problem."""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

__all__ = ["JOB_ERROR_CODES", "DistilleryError", "ErrorCode"]


class ErrorCode(StrEnum):
    # A request the API refused (the HTTP status says which kind).
    BAD_REQUEST = "bad_request"
    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"
    METRICS_DISABLED = "metrics_disabled"
    JOB_NOT_FOUND = "job_not_found"
    ARTIFACT_NOT_FOUND = "artifact_not_found"
    DATASET_NOT_FOUND = "dataset_not_found"
    MODEL_NOT_FOUND = "model_not_found"
    WEBHOOK_NOT_FOUND = "webhook_not_found"
    UPLOAD_NOT_FOUND = "upload_not_found"
    ARTIFACTS_EXPIRED = "artifacts_expired"
    JOB_STATE_CONFLICT = "job_state_conflict"
    UPLOAD_IN_USE = "upload_in_use"
    UPLOAD_STATE_CONFLICT = "upload_state_conflict"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UPLOAD_TIMEOUT = "upload_timeout"
    QUOTA_EXCEEDED = "quota_exceeded"
    OVERLOADED = "overloaded"
    DATABASE_UNAVAILABLE = "database_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    INSUFFICIENT_STORAGE = "insufficient_storage"
    INVALID_WEBHOOK = "invalid_webhook"
    INVALID_UPLOAD = "invalid_upload"
    # Refused at submit (422) or found by the pipeline later (the job fails with it).
    INVALID_SPEC = "invalid_spec"
    # A job's end (its `error.code`).
    INVALID_DATASET = "invalid_dataset"
    DATASET_INCOMPATIBLE = "dataset_incompatible"
    INVALID_MODEL = "invalid_model"
    NAN_LOSS = "nan_loss"
    PIPELINE_ERROR = "pipeline_error"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"  # ran past JOB_TIMEOUT_SECONDS
    WORKER_LOST = "worker_lost"  # its worker stopped heartbeating MAX_ATTEMPTS times
    STORAGE_ERROR = "storage_error"
    INTERNAL_ERROR = "internal_error"  # a bug: the server log has the trace


# The codes a failed or cancelled job can carry.
JOB_ERROR_CODES = frozenset(
    {
        ErrorCode.INVALID_SPEC,
        ErrorCode.INVALID_DATASET,
        ErrorCode.DATASET_INCOMPATIBLE,
        ErrorCode.INVALID_MODEL,
        ErrorCode.NAN_LOSS,
        ErrorCode.PIPELINE_ERROR,
        ErrorCode.CANCELLED,
        ErrorCode.TIMEOUT,
        ErrorCode.WORKER_LOST,
        ErrorCode.STORAGE_ERROR,
        ErrorCode.INTERNAL_ERROR,
    }
)


class DistilleryError(Exception):
    """An error with a stable `code` and a `message` for the person who caused it."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
