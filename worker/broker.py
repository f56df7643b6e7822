"""kombu's SQLAlchemy transport (the embedded broker), polling every 0.1 s instead of 1 s.

kombu's virtual transports sleep `polling_interval` between empty polls of a queue. At its
default of 1 s that sleep was most of an embedded job's submit->running time (927 ms median in
docs/BENCHMARKS.md), and the option cannot be set through `broker_transport_options`: this
transport hands every option to `create_engine()`. A poll is one indexed SELECT on a local
database, so ten a second cost nothing that shows.
"""

from __future__ import annotations

from kombu.transport import sqlalchemy

TRANSPORT = "worker.broker:Transport"  # for Celery's broker_transport (an import path)
PREFIX = "sqla+"  # kombu's URL prefix for its own SQLAlchemy transport


class Transport(sqlalchemy.Transport):
    polling_interval = 0.1


def broker_settings(url: str) -> tuple[str, str | None]:
    """(broker URL, transport) for Celery: `sqla+` URLs get this transport (kombu takes a
    transport named in the URL only from its alias table, so the prefix goes and the import
    path is given as `broker_transport`); any other URL is left to kombu."""
    if url.startswith(PREFIX):
        return url[len(PREFIX) :], TRANSPORT
    return url, None
