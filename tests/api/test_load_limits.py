"""What keeps one API process serving everyone under load: quotas per tenant (429 with
Retry-After, then recovery), a fast 503 when no database connection comes in time, the queue
allowlist, bounded event ids, security headers, artifact urls that ignore Host, and event
streams fanned out from one feed. (tests/reliability/test_waiting_clients.py loads a real
`serve` with hundreds of waiting clients.)"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.models import Job, utcnow
from app.services import jobs as jobs_service
from app.services import tenants
from tests.service_support import TINY_SPEC, client


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _submit(c: httpx.Client, **extra) -> httpx.Response:
    return c.post("/v1/jobs", json={**TINY_SPEC, **extra})


# --- quotas ---------------------------------------------------------------------------------


def test_requests_over_a_tenants_quota_get_429_others_do_not_wait(api, monkeypatch):
    """Two slow requests of one tenant fill its quota of 2: its third is refused at once
    with Retry-After, another tenant's goes through meanwhile, and once the slow ones end
    the first tenant is served again."""
    monkeypatch.setattr(api.settings, "TENANT_MAX_REQUESTS", 2)
    busy, release = _tenant(), threading.Event()
    real_list = jobs_service.list_jobs
    entered = threading.Semaphore(0)

    def slow_list(session, *, tenant_id, **kw):
        if tenant_id == tenant_ids[busy]:
            entered.release()
            release.wait(30)
        return real_list(session, tenant_id=tenant_id, **kw)

    tenant_ids = {busy: _tenant_id_of(api, busy)}
    monkeypatch.setattr(jobs_service, "list_jobs", slow_list)
    results: list[int] = []

    def hold():
        with client(api.url, api.key(busy)) as c:
            results.append(c.get("/v1/jobs").status_code)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    try:
        assert entered.acquire(timeout=20) and entered.acquire(timeout=20)
        with client(api.url, api.key(busy)) as c:
            r = c.get("/v1/jobs")
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "quota_exceeded"
        assert "TENANT_MAX_REQUESTS" in r.json()["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 1
        with api.client(_tenant()) as other:
            assert other.get("/v1/jobs").status_code == 200  # not queued behind the busy one
    finally:
        release.set()
        for t in holders:
            t.join(30)
    assert results == [200, 200]
    with client(api.url, api.key(busy)) as c:
        assert c.get("/v1/jobs").status_code == 200  # recovered


def _tenant_id_of(api, name: str) -> str:
    api.key(name)
    with api.db.session() as s:
        return tenants.ensure_tenant(s, name=name).id


def _first_event(response: httpx.Response) -> str:
    # The line iterator is kept with the response: a dropped one closes the connection.
    lines = response.__dict__.setdefault("_kept_lines", response.iter_lines())
    for line in lines:
        if line.startswith("event: "):
            return line.removeprefix("event: ")
    raise AssertionError("the stream ended before any event")


def test_event_streams_over_the_quota_get_429_and_recover(api, monkeypatch):
    monkeypatch.setattr(api.settings, "TENANT_MAX_STREAMS", 2)
    name = _tenant()
    with api.client(name) as c:
        job = _submit(c).json()["id"]  # stays queued: no worker reads this queue
        path = f"/v1/jobs/{job}/events"
        with c.stream("GET", path) as one, c.stream("GET", path) as two:
            assert _first_event(one) == _first_event(two) == "status"
            third = c.get(path, timeout=10)
            assert third.status_code == 429 and "TENANT_MAX_STREAMS" in third.text
            assert third.headers["Retry-After"] == "1"
            assert c.get("/v1/jobs").status_code == 200  # streams are not requests
            with api.client(_tenant()) as other:  # another tenant's quota is its own
                assert other.get(path).status_code == 404
        with c.stream("GET", path) as again:  # the two closed: room again
            assert again.status_code == 200 and _first_event(again) == "status"


def test_active_jobs_and_submissions_per_minute_have_quotas(api, monkeypatch):
    name = _tenant()
    monkeypatch.setattr(api.settings, "TENANT_MAX_ACTIVE_JOBS", 2)
    with api.client(name) as c:
        first, second = (_submit(c).json()["id"] for _ in range(2))
        r = _submit(c)
        assert r.status_code == 429 and "TENANT_MAX_ACTIVE_JOBS" in r.text
        assert r.headers["Retry-After"]
        assert c.post(f"/v1/jobs/{first}/cancel").status_code == 202
        assert _submit(c).status_code == 201  # one ended: room for one more
        assert _submit(c).status_code == 429
        with api.client(_tenant()) as other:
            assert _submit(other).status_code == 201

    monkeypatch.setattr(api.settings, "TENANT_MAX_ACTIVE_JOBS", 0)
    monkeypatch.setattr(api.settings, "TENANT_MAX_SUBMISSIONS_PER_MINUTE", 4)
    name = _tenant()
    with api.client(name) as c:
        ids = [_submit(c).json()["id"] for _ in range(4)]
        r = _submit(c)
        assert r.status_code == 429 and "TENANT_MAX_SUBMISSIONS_PER_MINUTE" in r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        with api.db.session() as s:  # a minute later, as far as the quota can tell
            s.execute(
                update(Job)
                .where(Job.id.in_(ids))
                .values(created_at=utcnow().replace(microsecond=0) - _minute())
            )
        assert _submit(c).status_code == 201


def _minute():
    from datetime import timedelta

    return timedelta(seconds=61)


# --- overload: a fast, honest 503 ------------------------------------------------------------


def test_no_database_connection_in_time_is_a_fast_503_and_healthz_still_answers(
    api, monkeypatch
):
    """Every pooled connection taken (a database that answers too slowly): a request gets 503
    `overloaded` with Retry-After after DB_POOL_TIMEOUT_SECONDS, not a 500 after 30 s; the
    liveness check, which needs no connection, answers at once."""
    engine = api.db.engine
    key = api.key(_tenant())  # made while connections are still to be had
    monkeypatch.setattr(engine.pool, "_timeout", 0.5)
    held = []
    try:
        while True:  # take them all: the last try waits its 0.5 s and gives up
            try:
                held.append(engine.connect())
            except PoolTimeout:
                break
        assert len(held) == engine.pool.size() + engine.pool._max_overflow
        with client(api.url, key) as c:
            started = time.monotonic()
            r = c.get("/v1/jobs")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "overloaded" and r.headers["Retry-After"]
            assert time.monotonic() - started < 10  # the pool's 0.5 s, not its old 30 s
            assert c.get("/healthz").status_code == 200
    finally:
        for conn in held:
            conn.close()
    with api.client(_tenant()) as c:
        assert c.get("/v1/jobs").status_code == 200


# --- queues, event ids, headers, urls --------------------------------------------------------


@pytest.mark.parametrize("queue", ["nobody-reads-this", "webhooks"])
def test_a_job_queue_must_be_one_the_operator_lists(api, queue):
    with api.client() as c:
        r = _submit(c, queue=queue)
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert message.startswith(f"queue: {queue!r} is not a job queue") and "JOB_QUEUES" in message


def test_listed_queues_and_patterns_are_accepted(api, monkeypatch):
    monkeypatch.setattr(api.settings, "JOB_QUEUES", ["gpu", "team-*"])
    with api.client() as c:
        assert _submit(c, queue="gpu").status_code == 201
        assert _submit(c, queue="team-a").status_code == 201
        assert _submit(c, queue="teamb").status_code == 422
    monkeypatch.setattr(api.settings, "JOB_QUEUES", ["*"])  # even a catch-all
    with api.client() as c:
        assert _submit(c, queue=api.settings.WEBHOOK_QUEUE).status_code == 422


def test_event_ids_past_64_bits_are_refused(api):
    with api.client() as c:
        job = _submit(c).json()["id"]
        path = f"/v1/jobs/{job}/events"
        r = c.get(path, params={"after": 2**63})
        assert r.status_code == 422 and "after" in r.json()["error"]["message"]
        r = c.get(path, headers={"Last-Event-ID": str(2**63)})
        assert r.status_code == 422 and "Last-Event-ID" in r.json()["error"]["message"]
        with c.stream("GET", path, params={"after": 2**63 - 1}) as r:  # the largest is fine
            assert r.status_code == 200


def test_every_response_carries_the_security_headers(api):
    with api.client() as c:
        for r in (c.get("/v1/jobs"), c.get("/v1/jobs/job_nope"), c.get("/docs"), c.get("/healthz")):
            assert r.headers["X-Content-Type-Options"] == "nosniff", r.url
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert r.headers["Referrer-Policy"] == "no-referrer"
        # the dashboard keeps its own, stricter policy
        assert "script-src 'self'" in c.get("/").headers["Content-Security-Policy"]
    with httpx.Client(base_url=api.url) as anonymous:
        assert anonymous.get("/v1/jobs").headers["X-Content-Type-Options"] == "nosniff"


def test_a_torchvision_spec_does_not_show_the_servers_data_root(api):
    spec = {**TINY_SPEC, "dataset": {"source": "torchvision", "name": "MNIST", "root": "/etc"}}
    with api.client() as c:
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        body = c.get(f"/v1/jobs/{r.json()['id']}").text
    assert str(api.settings.data_root) not in body and "/etc" not in body
    assert r.json()["spec"]["dataset"]["root"] == "./data"
