"""Hundreds of waiting clients against one real API process, loopback only, bounded.

Before issue 26 the embedded `serve` gave 500s after 30 s to 60 concurrent GETs, opened 1 of
100 event streams and left /healthz unanswered: each request held a pooled connection while it
waited for a thread, and each stream polled the database on its own. Here 100 streams and 150
GETs go to `serve` at once (spread over tenants, so that no quota refuses them), and on
PostgreSQL the streams are woken by NOTIFY, not by polling."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from app.core.db import Database
from app.services import tenants
from tests.service_support import TINY_SPEC, running_stack

pytestmark = pytest.mark.reliability

STREAMS, GETS = 100, 150
PARKED = {**TINY_SPEC, "queue": "parked"}  # no worker reads it: the jobs wait


def _keys(db_url: str, n: int) -> list[str]:
    db = Database(db_url)
    try:
        with db.session() as s:
            return [
                tenants.create_key(s, tenant_name=f"wait-{uuid.uuid4().hex[:8]}") for _ in range(n)
            ]
    finally:
        db.dispose()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Stream:
    """One open event stream: `opened` at its first event, `ended` at its `end` event."""

    def __init__(self) -> None:
        self.opened, self.ended = asyncio.Event(), asyncio.Event()
        self.events: list[str] = []

    async def follow(self, http: httpx.AsyncClient, job_id: str, key: str) -> None:
        async with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=_auth(key)) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    self.events.append(line.removeprefix("event: "))
                    self.opened.set()
                    if self.events[-1] == "end":
                        self.ended.set()
                        return


async def _healthz_probe(http: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    times = []
    while not stop.is_set():
        started = time.monotonic()
        r = await http.get("/healthz")
        assert r.status_code == 200
        times.append(time.monotonic() - started)
        await asyncio.sleep(0.05)
    return times


async def _get(http: httpx.AsyncClient, path: str, key: str) -> int:
    return (await http.get(path, headers=_auth(key))).status_code


async def _waiting_clients(url: str, stream_keys: list[str], get_keys: list[str]) -> dict:
    limits = httpx.Limits(max_connections=STREAMS + GETS + 10, max_keepalive_connections=20)
    async with httpx.AsyncClient(base_url=url, timeout=90, limits=limits) as http:
        jobs = {}
        for key in stream_keys + get_keys:
            r = await http.post("/v1/jobs", json=PARKED, headers=_auth(key))
            assert r.status_code == 201, r.text
            jobs[key] = r.json()["id"]
        streams = [Stream() for _ in range(STREAMS)]
        followers = [
            asyncio.create_task(s.follow(http, jobs[k], k))
            for s, k in zip(streams, stream_keys * (STREAMS // len(stream_keys)), strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(s.opened.wait() for s in streams)), 120)

        stop = asyncio.Event()
        probe = asyncio.create_task(_healthz_probe(http, stop))
        started = time.monotonic()
        codes = await asyncio.gather(
            *(
                _get(http, "/v1/jobs?limit=1" if i % 2 else f"/v1/jobs/{jobs[key]}", key)
                for i, key in enumerate(get_keys * (GETS // len(get_keys)))
            )
        )
        gets_took = time.monotonic() - started
        stop.set()
        healthz = await probe

        cancelled = time.monotonic()
        for key, job_id in jobs.items():
            assert (
                await http.post(f"/v1/jobs/{job_id}/cancel", headers=_auth(key))
            ).status_code == 202
        await asyncio.wait_for(asyncio.gather(*followers), 60)
        return {
            "codes": codes,
            "gets_took": gets_took,
            "healthz": healthz,
            "streams": streams,
            "ended_after": time.monotonic() - cancelled,
        }


def _check(out: dict) -> None:
    assert sorted(set(out["codes"])) == [200], out["codes"]  # no 5xx, nobody over a quota
    assert out["gets_took"] < 60  # was: 500s after 30-60 s
    assert max(out["healthz"]) < 5, max(out["healthz"])  # was: 30 s, or never
    assert all(
        s.events[0] == "status" and s.events[-2:] == ["status", "end"] for s in out["streams"]
    )


def test_serve_holds_100_streams_and_150_gets_at_once(served):
    url, _, home = served
    keys = _keys(f"sqlite:///{home / 'home' / 'distillery.db'}", 12)
    # 2 tenants hold 50 streams each, 10 tenants send 15 GETs each: within the default
    # quotas (TENANT_MAX_STREAMS 100, TENANT_MAX_REQUESTS 20), so every one must be served.
    out = asyncio.run(_waiting_clients(url, keys[:2], keys[2:]))
    _check(out)


def test_streams_on_postgresql_are_woken_by_notify(tmp_path):
    """The API's feed polls PostgreSQL only every 300 s here: streams that end within seconds
    of the cancel were woken by the trigger's NOTIFY."""
    overrides = {"EVENTS_FALLBACK_SECONDS": "300", "JOB_QUEUES": '["parked"]'}
    with running_stack(tmp_path, **overrides) as stack:
        keys = _keys(stack.env["DATABASE_URL"], 12)
        out = asyncio.run(_waiting_clients(stack.url, keys[:2], keys[2:]))
    _check(out)
    assert out["ended_after"] < 30
