"""200 concurrent submissions, a mix with repeated Idempotency-Keys, against the real
service (API + 2 workers on PostgreSQL and Redis): every accepted job is stored exactly once,
none is lost, all reach a terminal state."""

from __future__ import annotations

import collections
import concurrent.futures
import random

import pytest
from sqlalchemy import create_engine, func, select

from app.models import Job
from tests.service_support import client, running_stack, wait_until

pytestmark = pytest.mark.reliability

SUBMISSIONS = 200
KEYED = 150  # these share 30 keys, 5 submissions each; the other 50 carry no key
KEYS = 30

# As small as a job gets: every stage machine still runs (teacher, distill, evaluate on
# ONNX Runtime), so the workers do real work for each of the ~80 jobs.
LOAD_SPEC = {
    "dataset": {"source": "builtin", "name": "digits", "max_samples": 60},
    "teacher": {"arch": "cnn_tiny", "arch_kwargs": {"widths": [4]}, "epochs": 1},
    "student": {"arch": "cnn_tiny", "arch_kwargs": {"widths": [2]}},
    "distill": {"epochs": 1},
    "prune": None,
    "quantize": None,
    "export": [],
    "evaluate": {"latency_runs": 5, "latency_warmup": 0},
}


def test_concurrent_submissions_are_stored_once_and_all_finish(tmp_path):
    # Quotas are not what this test is about: one tenant sends 32 requests at once.
    with running_stack(tmp_path, PROGRESS_THROTTLE_SECONDS="1", TENANT_MAX_REQUESTS="0") as stack:
        stack.start_worker()
        stack.start_worker()
        plan = [f"load-{i % KEYS}" for i in range(KEYED)] + [None] * (SUBMISSIONS - KEYED)
        random.Random(0).shuffle(plan)

        def submit(i_key):
            i, key = i_key
            headers = {"Idempotency-Key": key} if key else {}
            with client(stack.url, stack.key) as c:
                r = c.post(
                    "/v1/jobs",
                    json={**LOAD_SPEC, "name": f"load-{i}"}
                    if key is None
                    else {**LOAD_SPEC, "name": key},
                    headers=headers,
                )
            return key, r.status_code, r.json().get("id")

        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(submit, enumerate(plan)))

        statuses = collections.Counter(code for _, code, _ in results)
        assert set(statuses) <= {200, 201}, statuses  # no 5xx, no 409 (same key, same body)
        by_key = collections.defaultdict(set)
        for key, _, job_id in results:
            if key:
                by_key[key].add(job_id)
        assert len(by_key) == KEYS and all(len(ids) == 1 for ids in by_key.values())
        accepted = {job_id for _, _, job_id in results}
        assert len(accepted) == KEYS + (SUBMISSIONS - KEYED)
        assert statuses[201] == len(accepted)  # exactly one creation per job

        engine = create_engine(stack.env["DATABASE_URL"])
        try:
            with engine.connect() as conn:
                stored = conn.scalar(select(func.count()).select_from(Job))
            assert stored == len(accepted)  # stored exactly once, nothing extra

            def all_terminal():
                with engine.connect() as conn:
                    rows = conn.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                counts = dict(rows)
                return counts if set(counts) <= {"succeeded", "failed", "cancelled"} else None

            counts = wait_until(all_terminal, 420, interval=2, what="every job to end")
        finally:
            engine.dispose()
        assert counts == {"succeeded": len(accepted)}
