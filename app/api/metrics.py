"""Prometheus metrics: request counts and latency from this process; job counts by status and
stage durations read from the database at scrape time (so every replica reports the same)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from starlette.types import ASGIApp, Receive, Scope, Send

from app.jobs.states import JobStatus
from app.services import jobs as jobs_service

STAGE_BUCKETS = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600]


class JobCollector:
    def __init__(self, db) -> None:
        self.db = db

    def collect(self):
        with self.db.session() as s:
            counts = jobs_service.counts_by_status(s)
            stages = jobs_service.stage_durations(s, buckets=STAGE_BUCKETS)
        jobs = GaugeMetricFamily("distillery_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status, 0))
        yield jobs
        hist = HistogramMetricFamily(
            "distillery_stage_duration_seconds", "Wall time of finished stages", labels=["stage"]
        )
        for name, st in stages.items():
            buckets = [(str(b), c) for b, c in zip(STAGE_BUCKETS, st["buckets"], strict=True)] + [
                ("+Inf", st["count"])
            ]
            hist.add_metric([name], buckets, st["sum"])
        yield hist


class Metrics:
    def __init__(self, db) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "distillery_http_requests",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "distillery_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(JobCollector(db))


class MetricsMiddleware:
    """Counts requests by route template (not raw path: ids would explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        started = time.perf_counter()

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], template, str(status["code"])).inc()
            self.metrics.latency.labels(scope["method"], template).observe(
                time.perf_counter() - started
            )
