"""What the API says about webhooks: the public models of the thin client package."""

from __future__ import annotations

from distillery.schemas import (
    DeliveriesPublic,
    DeliveryAttemptPublic,
    DeliveryPublic,
    WebhookCreate,
    WebhookCreated,
    WebhookPublic,
    WebhookSecretPublic,
    WebhooksPublic,
)

__all__ = [
    "DeliveriesPublic",
    "DeliveryAttemptPublic",
    "DeliveryPublic",
    "WebhookCreate",
    "WebhookCreated",
    "WebhookPublic",
    "WebhookSecretPublic",
    "WebhooksPublic",
]
