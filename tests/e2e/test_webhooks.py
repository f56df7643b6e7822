"""Webhooks end to end: `distillery serve` (its webhook worker included) delivering to a real
receiver on loopback (allowed by WEBHOOK_ALLOW_PRIVATE / WEBHOOK_ALLOW_HTTP in the `served`
fixture), verified with the `standardwebhooks` library as a receiver would."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.service_support import TINY_SPEC, cli, client, wait_for_status, wait_until
from tests.webhook_receiver import Receiver


@pytest.fixture(scope="module")
def tenant_key(served) -> str:
    """A tenant of its own: its endpoints hear only its jobs, not the other tests'."""
    _, _, home = served
    env = {"DISTILLERY_HOME": str(home / "home"), "DATABASE_URL": "", "DISTILLERY_API_KEY": ""}
    proc = cli(
        "keys",
        "create",
        "--tenant",
        f"hooks-{uuid.uuid4().hex[:6]}",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out.strip()


def _verify(secret: str, r) -> dict:
    return Webhook(secret).verify(r.body, r.headers)


def test_deliveries_are_signed_retried_and_recorded(served, tenant_key):
    url = served[0]
    with Receiver({"/flaky": [500, 500, 200]}) as rx, client(url, tenant_key) as c:
        stage_hook = c.post(
            "/v1/webhooks",
            json={"url": rx.url("/stages"), "events": ["job.stage", "job.succeeded"]},
        ).json()
        flaky = c.post("/v1/webhooks", json={"url": rx.url("/flaky")}).json()
        assert stage_hook["secret"].startswith("whsec_") and flaky["secret"] != stage_hook["secret"]
        listed = c.get("/v1/webhooks").json()["data"]
        assert {h["id"] for h in listed} == {stage_hook["id"], flaky["id"]}
        assert all("secret" not in h for h in listed)  # shown once, at creation
        spec = {**TINY_SPEC, "webhook": {"url": rx.url("/own")}}
        job = c.post("/v1/jobs", json=spec).json()
        done = wait_for_status(c, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done["error"]
        wait_until(lambda: len(rx.at("/flaky")) == 3 and rx.at("/own"), 60, what="deliveries")

        # The endpoint's three attempts: one delivery, one webhook-id, each signed.
        attempts = rx.at("/flaky")
        assert len({r.headers["webhook-id"] for r in attempts}) == 1
        bodies = [_verify(flaky["secret"], r) for r in attempts]
        assert all(b == bodies[0] for b in bodies)  # the same body every time
        with pytest.raises(WebhookVerificationError):
            _verify(stage_hook["secret"], attempts[0])  # another secret does not verify
        assert bodies[0]["type"] == "job.succeeded"
        assert bodies[0]["data"] == c.get(f"/v1/jobs/{job['id']}").json()  # the job as GET has it

        # The job's own webhook is signed with the tenant's secret.
        secret = c.get("/v1/webhooks/default/secret").json()["secret"]
        (own,) = rx.at("/own")
        assert _verify(secret, own)["data"]["id"] == job["id"]

        # Stage events: each stage's start and end (deliveries run in parallel: in any
        # order), and the end of the job.
        names = [s["name"] for s in done["stages"]]
        expected = sorted((n, st) for n in names for st in ("running", "succeeded"))
        wait_until(
            lambda: len(rx.at("/stages")) == len(expected) + 1, 60, what="the stage deliveries"
        )
        moves = [_verify(stage_hook["secret"], r) for r in rx.at("/stages")]
        assert (
            sorted((m["stage"], m["status"]) for m in moves if m["type"] == "job.stage") == expected
        )
        assert [m["type"] for m in moves].count("job.succeeded") == 1

        # Every attempt is recorded.
        d = c.get(f"/v1/webhooks/{flaky['id']}/deliveries").json()["data"]
        assert len(d) == 1 and d[0]["status"] == "succeeded"
        assert [a["status_code"] for a in d[0]["attempts"]] == [500, 500, 200]
        assert d[0]["id"] == attempts[0].headers["webhook-id"]
        about_job = c.get(f"/v1/jobs/{job['id']}/webhook-deliveries", params={"limit": 200})
        events = sorted(x["event"] for x in about_job.json()["data"])
        assert events.count("job.succeeded") == 3 and events.count("job.stage") == len(expected)
        for hook in (stage_hook, flaky):
            assert c.delete(f"/v1/webhooks/{hook['id']}").status_code == 204


def test_a_redirect_is_not_followed(served, tenant_key):
    with Receiver({"/moved": [302]}) as rx, client(served[0], tenant_key) as c:
        spec = {**TINY_SPEC, "webhook": {"url": rx.url("/moved"), "events": ["job.cancelled"]}}
        job = c.post("/v1/jobs", json=spec).json()
        c.post(f"/v1/jobs/{job['id']}/cancel")
        wait_until(lambda: len(rx.at("/moved")) >= 2, 60, what="a retried delivery")
        deliveries = c.get(f"/v1/jobs/{job['id']}/webhook-deliveries").json()["data"]
        assert deliveries[0]["attempts"][0]["status_code"] == 302
        assert rx.at("/redirected") == []
        body = json.loads(rx.at("/moved")[0].body)
        assert body["type"] == "job.cancelled" and body["data"]["status"] == "cancelled"
