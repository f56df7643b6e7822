"""The thin client against scripted transports: typed answers, what is retried, the SSE
parser (httpx-sse) on what the spec allows, reconnection, and the async client's parity."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from distillery import ApiError, AsyncClient, Client
from distillery.schemas import CandidatePublic, JobPublic

JOB = {
    "id": "job_1",
    "name": "x",
    "status": "succeeded",
    "stage": None,
    "progress": 1.0,
    "stages": [],
    "metrics": {},
    "error": None,
    "spec": {},
    "queue": "default",
    "attempts": 1,
    "created_at": "2026-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
    "updated_at": "2026-01-01T00:00:00Z",
}


def test_submit_says_whether_the_service_replayed_the_job():
    def handler(request: httpx.Request) -> httpx.Response:
        replay = request.headers["Idempotency-Key"] == "seen"
        headers = {"Idempotent-Replayed": "true"} if replay else {}
        return httpx.Response(200 if replay else 201, json=JOB, headers=headers)

    with Client("http://api", "k", transport=httpx.MockTransport(handler)) as c:
        assert c.submit({}, idempotency_key="seen").replayed is True
        fresh = c.submit({}, idempotency_key="new")
        assert fresh.replayed is False and isinstance(fresh, JobPublic)


def test_candidates_are_typed():
    candidate = {
        "key": "s0-p30-int8",
        "branch": 2,
        "axes": {"student": "cnn_tiny", "prune": 0.3},
        "metrics": {"accuracy": 0.91, "accuracy_ci": [0.88, 0.94], "latency_b32_ms": 1.5},
        "gates": [{"gate": "final.accuracy>=0.9", "value": 0.91, "passed": True}],
        "gates_passed": True,
        "on_front": True,
        "final": False,
        "artifacts": ["model.int8.onnx"],
    }
    transport = httpx.MockTransport(
        lambda r: (
            httpx.Response(200, json={"data": [candidate]})
            if r.url.path == "/v1/jobs/job_1/candidates"
            else httpx.Response(404, json={"error": {"code": "not_found", "message": r.url.path}})
        )
    )
    with Client("http://api", "k", transport=transport) as c:
        (got,) = c.candidates("job_1")
    assert isinstance(got, CandidatePublic) and got.gates[0].passed and got.on_front
    assert got.metrics["accuracy_ci"] == [0.88, 0.94]


# An event stream as the spec allows it: CRLF line ends, a comment, a field without a space
# after its colon, data over two lines (joined with \n), a retry field, and an event the
# client does not know (passed through).
STREAM = (
    b": keep-alive\r\n\r\n"
    b'id: 1\r\nevent: status\r\ndata: {"status":\r\ndata: "running"}\r\n\r\n'
    b'retry: 1000\r\nid:2\r\nevent:progress\r\ndata:{"progress": 0.5, "stage": "distill"}\r\n\r\n'
    b"id: 3\r\nevent: future_kind\r\ndata: {}\r\n\r\n"
)


def test_events_parse_what_the_sse_spec_allows_and_reconnect_after_the_last_id():
    seen_ids = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_ids.append(request.headers["Last-Event-ID"])
        if len(seen_ids) == 1:  # the first connection drops after three events
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=STREAM
            )
        end = b'id: 3\nevent: end\ndata: {"status": "succeeded"}\n\n'
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=end)

    with Client(
        "http://api", "k", transport=httpx.MockTransport(handler), sleep=lambda s: None
    ) as c:
        events = list(c.events("job_1"))
    assert [(e.id, e.type) for e in events] == [
        (1, "status"),
        (2, "progress"),
        (3, "future_kind"),
        (3, "end"),
    ]
    assert events[0].data == {"status": "running"} and events[1].data["progress"] == 0.5
    assert seen_ids == ["0", "3"]  # reconnected after the last event it had


def test_events_of_an_unknown_job_raise_the_api_error():
    transport = httpx.MockTransport(
        lambda r: httpx.Response(404, json={"error": {"code": "job_not_found", "message": "no"}})
    )
    with Client("http://api", "k", transport=transport) as c, pytest.raises(ApiError) as e:
        list(c.events("job_x"))
    assert e.value.code == "job_not_found"


def test_the_async_client_retries_what_is_safe_and_only_that():
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            return httpx.Response(
                503, headers={"Retry-After": "2"}, json={"error": {"code": "busy", "message": "x"}}
            )
        if request.method == "POST":
            return httpx.Response(503, json={"error": {"code": "busy", "message": "x"}})
        return httpx.Response(200, json=JOB)

    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async def main() -> None:
        async with AsyncClient(
            "http://api", "k", transport=httpx.MockTransport(handler), sleep=sleep
        ) as c:
            job = await c.wait("job_1")
            assert job.status == "succeeded"
            with pytest.raises(ApiError):
                await c.cancel("job_1")  # a POST without an Idempotency-Key: sent once

    asyncio.run(main())
    assert calls == ["GET", "GET", "POST"] and slept == [2.0]


def test_the_async_client_streams_events_too():
    body = b'id: 7\nevent: stage\ndata: {"stage": "teacher"}\n\nid: 8\nevent: end\ndata: {}\n\n'
    transport = httpx.MockTransport(
        lambda r: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    )

    async def main() -> list:
        async with AsyncClient("http://api", "k", transport=transport) as c:
            return [(e.id, e.type) async for e in c.events("job_1")]

    assert asyncio.run(main()) == [(7, "stage"), (8, "end")]
