"""Which tasks a worker process loads: the webhook worker (`distillery worker -Q webhooks`)
must not be able to run a job, even if a job's message reaches its queue."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.service_support import REPO

LOADED = """
import json, sys
from app.core.config import Settings
from worker import celery_app
include = celery_app.WEBHOOK_TASKS if sys.argv[1] == "webhooks" else None
app = celery_app.make_celery(Settings(), include=include)
app.loader.import_default_modules()
print(json.dumps(sorted(t for t in app.tasks if t.startswith("distillery."))))
"""


def _tasks(kind: str) -> list[str]:
    # A process of its own: Celery's shared tasks join every app of the process that
    # imported them, so this test's process (which imports worker.tasks) cannot tell.
    out = subprocess.run(
        [sys.executable, "-c", LOADED, kind], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_webhook_worker_loads_the_delivery_task_alone():
    assert _tasks("webhooks") == ["distillery.deliver_webhook"]


def test_a_job_worker_loads_both():
    assert _tasks("jobs") == ["distillery.deliver_webhook", "distillery.run_job"]
