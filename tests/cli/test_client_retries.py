"""The client's retry policy, against a scripted transport: what is retried and what is not."""

import httpx
import pytest

from app.client import ApiError, Client

JOB = {
    "id": "job_1",
    "name": "x",
    "status": "queued",
    "stage": None,
    "progress": 0.0,
    "stages": [],
    "metrics": {},
    "error": None,
    "spec": {},
    "queue": "default",
    "attempts": 0,
    "created_at": "2026-01-01T00:00:00Z",
    "started_at": None,
    "finished_at": None,
    "updated_at": "2026-01-01T00:00:00Z",
}


def scripted(*responses):
    calls = []

    def handler(request: httpx.Request):
        calls.append(request)
        item = responses[min(len(calls) - 1, len(responses) - 1)]
        if isinstance(item, Exception):
            raise item
        return item

    return httpx.MockTransport(handler), calls


def make(transport, slept):
    return Client(
        "http://api", "dk_test", transport=transport, sleep=slept.append, retries=3, backoff=0.1
    )


def test_get_retries_503_honouring_retry_after_then_succeeds():
    transport, calls = scripted(
        httpx.Response(
            503,
            headers={"Retry-After": "2"},
            json={"error": {"code": "unavailable", "message": "x"}},
        ),
        httpx.Response(
            429, headers={"Retry-After": "1"}, json={"error": {"code": "rate", "message": "x"}}
        ),
        httpx.Response(200, json=JOB),
    )
    slept = []
    assert make(transport, slept).get("job_1").id == "job_1"
    assert len(calls) == 3 and slept == [2.0, 1.0]


def test_connection_errors_are_retried_for_gets_with_backoff():
    transport, calls = scripted(
        httpx.ConnectError("refused"), httpx.ConnectError("refused"), httpx.Response(200, json=JOB)
    )
    slept = []
    make(transport, slept).get("job_1")
    assert len(calls) == 3 and slept == [0.1, 0.2]


def test_submit_sends_an_idempotency_key_and_retries_with_the_same_one():
    transport, calls = scripted(httpx.ConnectError("reset"), httpx.Response(201, json=JOB))
    make(transport, []).submit({"name": "x"})
    keys = [c.headers["Idempotency-Key"] for c in calls]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0].startswith("client-")


def test_a_post_without_an_idempotency_key_is_never_retried():
    transport, calls = scripted(
        httpx.Response(503, json={"error": {"code": "unavailable", "message": "busy"}})
    )
    with pytest.raises(ApiError) as e:
        make(transport, []).cancel("job_1")
    assert len(calls) == 1 and e.value.status == 503
    transport, calls = scripted(httpx.ConnectError("refused"))
    with pytest.raises(httpx.ConnectError):
        make(transport, []).cancel("job_1")
    assert len(calls) == 1


def test_retries_are_bounded_and_client_errors_are_not_retried():
    transport, calls = scripted(
        httpx.Response(503, json={"error": {"code": "unavailable", "message": "down"}})
    )
    with pytest.raises(ApiError, match="503 unavailable: down"):
        make(transport, []).get("job_1")
    assert len(calls) == 4  # the first try and 3 retries
    transport, calls = scripted(
        httpx.Response(404, json={"error": {"code": "job_not_found", "message": "no job"}})
    )
    with pytest.raises(ApiError) as e:
        make(transport, []).get("job_1")
    assert len(calls) == 1 and e.value.code == "job_not_found"
