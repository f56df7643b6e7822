"""Webhooks: the events a receiver can subscribe to, and a delivery's statuses (what
GET /v1/webhooks/{id}/deliveries shows)."""

from __future__ import annotations

from enum import StrEnum

from distillery_contract.states import JobStatus

__all__ = ["DEFAULT_EVENTS", "TERMINAL_EVENTS", "DeliveryStatus", "WebhookEvent"]


class WebhookEvent(StrEnum):
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"
    STAGE = "job.stage"  # a stage started or ended


# The event each job end sends.
TERMINAL_EVENTS: dict[JobStatus, WebhookEvent] = {
    JobStatus.SUCCEEDED: WebhookEvent.SUCCEEDED,
    JobStatus.FAILED: WebhookEvent.FAILED,
    JobStatus.CANCELLED: WebhookEvent.CANCELLED,
}
# What an endpoint or a job's webhook hears when it names no events: how each job ended.
DEFAULT_EVENTS: tuple[WebhookEvent, ...] = tuple(TERMINAL_EVENTS.values())


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # due, being tried, or waiting for its next attempt
    SUCCEEDED = "succeeded"  # a receiver answered 2xx
    FAILED = "failed"  # given up after WEBHOOK_RETRY_FOR_SECONDS
