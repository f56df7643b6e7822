"""Enqueue-after-commit, against a real database: the message goes out only once the job is
committed, never for a rolled-back one, and the request never needs a second connection."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import sessionmaker

from app.core.config import Settings
from app.core.migrate import upgrade
from app.models import Job
from app.services import jobs, tenants
from tests.service_support import TINY_SPEC, postgres_database
from worker.pipeline.spec import JobSpec


@pytest.fixture(params=["sqlite", "postgres"])
def one_connection(request, tmp_path):
    """A sessionmaker whose pool holds a single connection, as a burst of requests as large
    as the pool leaves each of them: asking for a second one times out after 2 s."""

    def make(url):
        upgrade(url)
        engine = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=2)
        try:
            yield sessionmaker(engine, expire_on_commit=False)
        finally:
            engine.dispose()

    if request.param == "postgres":
        with postgres_database() as url:
            yield from make(url)
    else:
        yield from make(f"sqlite:///{tmp_path / 'jobs.db'}")


def _submit(session, sent, settings):
    tenant = tenants.ensure_tenant(session, name="alice")
    job, created = jobs.create_job(
        session,
        tenant_id=tenant.id,
        spec=JobSpec.model_validate(TINY_SPEC),
        idempotency_key=None,
        settings=settings,
        enqueue=lambda job_id, queue: sent.append((job_id, queue)),
    )
    assert created
    return job


def test_a_submission_is_sent_after_commit_on_the_requests_one_connection(one_connection, tmp_path):
    settings = Settings(DISTILLERY_HOME=tmp_path)
    sent: list[tuple[str, str]] = []
    session = one_connection()
    try:
        job = _submit(session, sent, settings)
        assert sent == []  # nothing goes out before the commit
        session.commit()  # the callback writes enqueued_at through the pool's only connection
    finally:
        session.close()
    assert sent == [(job.id, job.queue)]
    with one_connection() as s:
        assert s.scalar(select(Job.enqueued_at).where(Job.id == job.id)) is not None


def test_a_rolled_back_submission_is_never_sent(one_connection, tmp_path):
    settings = Settings(DISTILLERY_HOME=tmp_path)
    sent: list[tuple[str, str]] = []
    with one_connection() as session:
        job_id = _submit(session, sent, settings).id
        with session.begin_nested():  # a released savepoint is not the commit
            pass
        session.rollback()
        session.commit()  # a later, empty transaction does not send what was rolled back
    assert sent == []
    with one_connection() as s:
        assert s.scalar(select(Job).where(Job.id == job_id)) is None


def test_the_pool_really_holds_one_connection(one_connection):
    # The two tests above mean something only if a second connection would time out.
    with one_connection() as first, one_connection() as second:
        first.execute(select(1))
        with pytest.raises(PoolTimeout):
            second.execute(select(1))
