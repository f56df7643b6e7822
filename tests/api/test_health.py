from app.core.config import Settings
from app.main import create_app
from tests.service_support import TINY_SPEC, ThreadServer, client


def _set_worker(api, queues, heartbeat_at=None):
    from app.jobs import workers
    from app.models import Worker

    with api.db.session() as s:
        workers.register_worker(s, worker="testhost:1", hostname="testhost", pid=1, queues=queues)
        if heartbeat_at is not None:
            s.get(Worker, "testhost:1").heartbeat_at = heartbeat_at


def test_liveness_and_readiness_which_needs_a_live_worker(api):
    from datetime import timedelta

    from app.jobs import workers
    from app.models import utcnow

    queue = api.settings.DEFAULT_QUEUE
    with api.client(None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")  # no worker at all: jobs would wait forever
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json()["checks"] == {
            "database": "ok",
            "broker": "ok",
            "storage": "ok",
            "workers": f"error: no live worker consumes queue {queue!r}; start one "
            "(distillery worker)",
        }
        try:
            _set_worker(api, ["gpu"])  # a worker, but not on the default queue
            assert c.get("/readyz").status_code == 503
            _set_worker(api, ["gpu", queue])
            r = c.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["checks"]["workers"] == "ok"
            stale = utcnow() - timedelta(seconds=api.settings.HEARTBEAT_TIMEOUT_SECONDS + 1)
            _set_worker(api, [queue], heartbeat_at=stale)  # silent too long: dead
            assert c.get("/readyz").status_code == 503
        finally:
            with api.db.session() as s:
                workers.forget_worker(s, worker="testhost:1")


def test_readiness_fails_when_the_broker_is_down(tmp_path):
    settings = Settings(
        DISTILLERY_HOME=tmp_path, BROKER_URL="redis://127.0.0.1:1/0", REAPER_INTERVAL_SECONDS=3600
    )
    with ThreadServer(create_app(settings)) as server, client(server.url, None) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    checks = r.json()["checks"]
    assert checks["database"] == "ok" and checks["broker"].startswith("error:")


def test_prometheus_metrics_count_requests_and_jobs(api, monkeypatch):
    monkeypatch.setattr(api.settings, "METRICS_TOKEN", "scrape-me")
    with api.client("metrics") as c:
        job = c.post("/v1/jobs", json=TINY_SPEC).json()
        c.get(f"/v1/jobs/{job['id']}")
        r = c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert r.status_code == 200, r.text
    text = r.text
    assert (
        'distillery_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"}'
        in text
    )
    queued = next(
        line for line in text.splitlines() if line.startswith('distillery_jobs{status="queued"}')
    )
    assert float(queued.split()[-1]) >= 1
    assert "# TYPE distillery_stage_duration_seconds histogram" in text


def test_metrics_answer_only_the_metrics_token(api, monkeypatch):
    """The job counts span every tenant: no anonymous caller and no tenant's key reads them."""
    monkeypatch.setattr(api.settings, "METRICS_TOKEN", "scrape-me")
    for headers in (
        {},
        {"Authorization": "Bearer scrape-mE"},
        {"Authorization": f"Bearer {api.key('metrics')}"},
    ):
        with api.client(None) as c:
            r = c.get("/metrics", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
        assert "METRICS_TOKEN" in r.json()["error"]["message"]


def test_metrics_are_off_without_a_metrics_token(api):
    assert api.settings.METRICS_TOKEN is None
    with api.client("metrics") as c:
        r = c.get("/metrics", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "metrics_disabled" and "Set METRICS_TOKEN" in error["message"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(api):
    with api.client() as c:
        r = c.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.delete("/v1/jobs")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
