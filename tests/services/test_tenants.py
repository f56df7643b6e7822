"""Every API process ensures DISTILLERY_API_KEY's tenant and key at start-up, so `api
--workers N` starts N of them at once: all must come up (two once died on a duplicate
'default' tenant)."""

from __future__ import annotations

import threading

from sqlalchemy import func, select

from app.core.db import Database
from app.core.migrate import upgrade
from app.models import ApiKey, Tenant
from app.services import tenants
from tests.service_support import postgres_database


def test_concurrent_start_ups_share_one_tenant_and_key():
    with postgres_database() as url:
        upgrade(url)
        db = Database(url)
        start, errors = threading.Barrier(8), []

        def start_up() -> None:
            start.wait()
            try:
                with db.session() as s:
                    tenants.create_key(s, tenant_name="default", key="dk_the_same_key")
            except Exception as e:  # collected: an assert in a thread would go unseen
                errors.append(e)

        threads = [threading.Thread(target=start_up) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with db.session() as s:
            counts = (
                s.scalar(select(func.count()).select_from(Tenant)),
                s.scalar(select(func.count()).select_from(ApiKey)),
            )
            assert tenants.authenticate(s, key="dk_the_same_key").name == "default"
        db.dispose()
    assert errors == [] and counts == (1, 1)
