"""The embedded broker: kombu's SQLAlchemy transport, polled every 0.1 s (kombu's 1 s default
was most of an embedded job's submit->running latency)."""

from __future__ import annotations

import threading

from app.core.config import Settings
from worker.broker import Transport, broker_settings
from worker.celery_app import make_celery


def test_sqla_urls_get_our_transport_and_others_are_left_alone():
    assert broker_settings("sqla+sqlite:////x/broker.db") == (
        "sqlite:////x/broker.db",
        "worker.broker:Transport",
    )
    assert broker_settings("redis://127.0.0.1:6379/0") == ("redis://127.0.0.1:6379/0", None)


def test_embedded_broker_delivers_with_the_short_poll(tmp_path):
    s = Settings(DISTILLERY_HOME=str(tmp_path))
    assert s.broker_url.startswith("sqla+sqlite:")
    app = make_celery(s)
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        assert conn.transport.polling_interval == 0.1
        queue = conn.SimpleQueue("q")

        def later() -> None:  # another connection, as the API publishes while a worker waits
            with make_celery(s).connection_for_write() as other:
                other.SimpleQueue("q").put({"job": "j1"})

        threading.Timer(0.3, later).start()
        message = queue.get(timeout=10)
        assert message.payload == {"job": "j1"}
        message.ack()
        queue.close()
