"""The Celery application, built from Settings by `make_celery` (never at import: a test or a
second worker builds its own). The API sends messages by task name, so it never imports the
ML code; workers import worker.tasks through `include`."""

from __future__ import annotations

from celery import Celery

from app.core.config import Settings
from worker.broker import broker_settings

# The task that runs one job, by the name on the wire (kept: queued messages carry it).
JOB_TASK = "distillery.run_job"
# The task that makes one attempt of a webhook delivery (worker/webhooks.py).
WEBHOOK_TASK = "distillery.deliver_webhook"


ALL_TASKS = ("worker.tasks", "worker.webhooks")
WEBHOOK_TASKS = ("worker.webhooks",)  # what a worker of WEBHOOK_QUEUE alone loads


def make_celery(s: Settings, *, include: tuple[str, ...] | None = None) -> Celery:
    broker, transport = broker_settings(s.broker_url)
    app = Celery("distillery", broker=broker, include=list(include or ALL_TASKS))
    app.distillery_settings = s  # what worker.runtime.runtime_of builds the worker's runtime from
    app.conf.update(
        broker_transport=transport,
        # The DB row is the source of truth; the message is only "look at job X".
        task_ignore_result=True,
        result_backend=None,
        # Ack after the task ends: a worker killed mid-job leaves the message to be redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=s.DEFAULT_QUEUE,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(s),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def _transport_options(s: Settings) -> dict:
    if s.broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands every option to create_engine() (its polling
        # interval is set in worker/broker.py) and has no visibility timeout (a lost worker's
        # job is re-queued by the reaper).
        return {}
    # Redis redelivers an unacknowledged message after visibility_timeout: longer than any stage.
    return {"visibility_timeout": s.VISIBILITY_TIMEOUT_SECONDS}


def make_enqueue(app: Celery):
    def enqueue(job_id: str, queue: str) -> None:
        """Send the run message; fails fast when the broker is down (the reaper sends it later)."""
        app.send_task(
            JOB_TASK,
            args=[job_id],
            queue=queue,
            retry=True,
            retry_policy={
                "max_retries": 2,
                "interval_start": 0.1,
                "interval_step": 0.2,
                "interval_max": 0.5,
            },
        )

    return enqueue


def make_send_webhook(app: Celery):
    queue = app.distillery_settings.WEBHOOK_QUEUE

    def send_webhook(delivery_id: str, countdown: float = 0.0) -> None:
        """Send a delivery's task, due in `countdown` seconds; fails fast when the broker is
        down (the delivery stays pending and the reaper sends it later)."""
        app.send_task(
            WEBHOOK_TASK,
            args=[delivery_id],
            queue=queue,
            countdown=countdown or None,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )

    return send_webhook


def make_queue_size(app: Celery):
    def queue_size(queue: str) -> int | None:
        """Messages waiting in `queue` (0 when the broker does not know the queue), or None
        when the broker cannot be asked."""
        from kombu.exceptions import ChannelError

        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                try:
                    return conn.default_channel.queue_declare(
                        queue=queue, passive=True
                    ).message_count
                except ChannelError:  # e.g. Redis restarted without persistence: queue gone
                    return 0
        except Exception:
            return None

    return queue_size
