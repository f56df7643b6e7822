"""Webhook endpoints through the API: what may be registered (safe by default), listing,
deleting, and the secret shown once. Deliveries run end to end in tests/e2e/test_webhooks.py."""

from __future__ import annotations

import contextlib

import pytest

from tests.service_support import TINY_SPEC


@contextlib.contextmanager
def allowing_loopback(api):
    """The operator's settings that let webhooks reach loopback over http (read per request)."""
    s = api.settings
    before = (s.WEBHOOK_ALLOW_HTTP, s.WEBHOOK_ALLOW_PRIVATE)
    s.WEBHOOK_ALLOW_HTTP = s.WEBHOOK_ALLOW_PRIVATE = True
    try:
        yield
    finally:
        s.WEBHOOK_ALLOW_HTTP, s.WEBHOOK_ALLOW_PRIVATE = before


@pytest.mark.parametrize(
    "url,message",
    [
        ("https://10.1.2.3/hook", "10.1.2.3, a private, loopback or link-local address"),
        ("https://127.0.0.1:8443/hook", "a private, loopback or link-local address"),
        ("https://localhost/hook", "localhost resolves to"),  # refused after DNS, not by name
        ("https://169.254.169.254/latest/meta-data", "private, loopback or link-local"),
        ("https://[::ffff:192.168.0.1]/hook", "private, loopback or link-local"),
        ("https://[fe80::1]/hook", "private, loopback or link-local"),
        ("http://203.0.114.7/hook", "must be an https URL"),
        ("https://user:pw@203.0.114.7/hook", "must not carry a user name or password"),
        ("https://no-such-host.invalid/hook", "cannot resolve"),
    ],
)
def test_an_unsafe_url_is_refused_with_422(api, url, message):
    with api.client() as c:
        r = c.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 422, r.text
        assert (
            r.json()["error"]["code"] == "invalid_webhook"
            and message in r.json()["error"]["message"]
        )
        assert c.get("/v1/webhooks").json()["data"] == []


def test_a_jobs_webhook_is_checked_at_submit(api):
    spec = {**TINY_SPEC, "webhook": {"url": "https://192.168.1.10/ci"}}
    with api.client() as c:
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 422
        assert r.json()["error"]["message"].startswith("webhook.url: 192.168.1.10 resolves to")
        bad = {**TINY_SPEC, "webhook": {"url": "https://x.example", "events": ["job.done"]}}
        r = c.post("/v1/jobs", json=bad)
        assert r.status_code == 422 and "webhook.events[0]" in r.json()["error"]["message"]


def test_endpoints_are_listed_without_their_secret_and_deleted_per_tenant(api):
    with allowing_loopback(api), api.client("hooker") as c:
        made = c.post(
            "/v1/webhooks",
            json={"url": "http://127.0.0.1:9/hook", "events": ["job.failed"], "description": "ci"},
        )
        assert made.status_code == 201, made.text
        hook = made.json()
        assert hook["secret"].startswith("whsec_") and hook["events"] == ["job.failed"]
        listed = c.get("/v1/webhooks").json()["data"]
        assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
        assert c.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"] == []
        with api.client("bob") as other:
            assert other.get("/v1/webhooks").json()["data"] == []
            assert other.delete(f"/v1/webhooks/{hook['id']}").status_code == 404
            assert other.get(f"/v1/webhooks/{hook['id']}/deliveries").status_code == 404
        assert c.delete(f"/v1/webhooks/{hook['id']}").status_code == 204
        assert c.get("/v1/webhooks").json()["data"] == []


def test_the_job_webhook_secret_is_one_per_tenant(api):
    with api.client("secretive") as c:
        first = c.get("/v1/webhooks/default/secret").json()["secret"]
        assert (
            first.startswith("whsec_")
            and c.get("/v1/webhooks/default/secret").json()["secret"] == first
        )
    with api.client("bob") as c:
        assert c.get("/v1/webhooks/default/secret").json()["secret"] != first
