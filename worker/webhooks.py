"""The Celery task that makes one attempt of a webhook delivery: claim it (one attempt at a
time), freeze its body at the first attempt (the job as GET /v1/jobs/{id} returns it), sign
and send it, record the attempt; a failed one is sent again after its backoff. Consumed from
WEBHOOK_QUEUE by a worker of its own (`distillery worker -Q webhooks --pool threads`): a job
worker runs one job at a time and would hold deliveries back for hours."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery import shared_task

from app.core.errors import NotFound
from app.services.jobs import get_job, stages_of, to_public
from app.webhooks import outbox, sender
from worker.celery_app import WEBHOOK_TASK
from worker.runtime import Runtime, runtime_of

log = logging.getLogger("distillery.webhooks")


@shared_task(bind=True, name=WEBHOOK_TASK, acks_late=True, ignore_result=True)
def webhook_task(self: Any, delivery_id: str) -> str:
    return deliver(runtime_of(self.app), delivery_id)


def _payload(runtime: Runtime, claimed: outbox.Claimed) -> dict[str, Any]:
    """Standard Webhooks' envelope: type, timestamp, and the job as GET returns it."""
    with runtime.db.session() as s:
        job = get_job(s, tenant_id=claimed.tenant_id, job_id=claimed.job_id)
        public = to_public(job, stages_of(s, job_ids=[job.id])[job.id])
    payload: dict[str, Any] = {
        "type": claimed.event,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": public.model_dump(mode="json"),
    }
    if claimed.detail:
        payload.update(claimed.detail)  # job.stage: which stage moved, and to what
    return payload


def deliver(runtime: Runtime, delivery_id: str) -> str:
    """One attempt. Returns what happened: sent, retrying, failed, or skipped (not due, or
    another attempt has it, or its job was deleted)."""
    s = runtime.settings
    with runtime.db.session() as session:
        claimed = outbox.claim(
            session, delivery_id=delivery_id, lease_seconds=2 * s.WEBHOOK_TIMEOUT_SECONDS + 30
        )
    if claimed is None:
        return "skipped"
    try:
        payload = claimed.payload or _payload(runtime, claimed)
    except NotFound:  # the job was deleted since (its deliveries go with it)
        return "skipped"
    if claimed.payload is None:
        with runtime.db.session() as session:
            outbox.freeze_payload(session, delivery_id=claimed.id, payload=payload)
    body = sender.body_of(payload)
    outcome = sender.post(
        claimed.url,
        body,
        sender.signed_headers(claimed.secret, claimed.id, body),
        timeout=s.WEBHOOK_TIMEOUT_SECONDS,
        allow_http=s.WEBHOOK_ALLOW_HTTP,
        allow_private=s.WEBHOOK_ALLOW_PRIVATE,
    )
    with runtime.db.session() as session:
        delay = outbox.record_attempt(
            session,
            claimed=claimed,
            outcome=outcome,
            retry_for=s.WEBHOOK_RETRY_FOR_SECONDS,
            base=s.WEBHOOK_RETRY_BASE_SECONDS,
            cap=s.WEBHOOK_RETRY_MAX_SECONDS,
        )
    if outcome.ok:
        return "sent"
    log.info(
        "webhook %s attempt %d: %s",
        claimed.id,
        claimed.attempt,
        outcome.error or outcome.status_code,
    )
    return "failed" if delay is None else "retrying"
