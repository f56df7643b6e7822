"""The contract package is what the API, the worker and the thin client share: it must load
alone (no torch, none of the three packages), and each protocol word in it must be the one
both sides use."""

from __future__ import annotations

import subprocess
import sys

from app.core.errors import AppError, SpecInvalid
from distillery_contract.errors import JOB_ERROR_CODES, DistilleryError, ErrorCode
from distillery_contract.states import TERMINAL, JobStatus
from distillery_contract.webhooks import DEFAULT_EVENTS, TERMINAL_EVENTS, WebhookEvent
from worker.pipeline.errors import Cancelled, PipelineError, SpecError


def test_the_contract_loads_without_torch_or_the_packages_that_use_it():
    code = (
        "import sys, distillery_contract.states, distillery_contract.errors, "
        "distillery_contract.webhooks\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'app', 'worker', 'distillery', 'sqlalchemy', 'pydantic', 'httpx'})\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_api_and_the_pipeline_raise_one_kind_of_error_with_one_spelling():
    assert issubclass(AppError, DistilleryError) and issubclass(PipelineError, DistilleryError)
    assert SpecInvalid.code == SpecError.code == "invalid_spec"
    assert Cancelled.code == ErrorCode.CANCELLED == JobStatus.CANCELLED.value
    assert {Cancelled.code, SpecError.code} <= JOB_ERROR_CODES


def test_each_job_end_has_its_webhook_event_and_the_default_is_the_ends():
    assert set(TERMINAL_EVENTS) == TERMINAL
    assert {e.value for e in TERMINAL_EVENTS.values()} == {
        "job.succeeded", "job.failed", "job.cancelled"
    }  # fmt: skip
    assert set(DEFAULT_EVENTS) == set(TERMINAL_EVENTS.values())
    assert WebhookEvent.STAGE not in DEFAULT_EVENTS
