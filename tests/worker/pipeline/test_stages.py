"""Stages are a registry: adding one is one decorated function, and a job then runs it,
records it, resumes past it and publishes what it writes (docs/pipeline.md, "Adding a stage")."""

from __future__ import annotations

import hashlib
import json
from typing import get_args

import pytest

from tests.service_support import TINY_SPEC
from worker.pipeline.export import EXPORTERS
from worker.pipeline.registry import UnknownName
from worker.pipeline.runner import run_pipeline
from worker.pipeline.spec import ExportFormat, JobSpec
from worker.pipeline.stages import STAGES

SPEC = {**TINY_SPEC, "name": "with-a-census", "prune": None, "quantize": None}


@pytest.fixture
def census():
    """A stage after distill that counts the kept student's parameters into census.json;
    it runs only for specs named `with-a-census`."""
    calls = []

    @STAGES.register(
        "census",
        after="distill",
        enabled=lambda spec: spec.name == "with-a-census",
        artifacts=lambda spec: {"census.json": "json"},
    )
    def census_stage(state, ctx, resumed):
        calls.append(resumed)
        params = sum(p.numel() for p in state.models["kept"].parameters())
        (state.out / "census.json").write_text(json.dumps({"params": params}))
        return {"params": params}

    yield calls
    STAGES.unregister("census")


def test_a_registered_stage_runs_in_its_place_is_recorded_and_published(census, tmp_path):
    spec = JobSpec.model_validate(SPEC)
    assert [s.name for s in STAGES.plan(spec)] == [
        "teacher", "baseline", "distill", "census", "export"
    ]  # fmt: skip
    other = JobSpec.model_validate({**SPEC, "name": "plain"})
    assert "census" not in [s.name for s in STAGES.plan(other)]

    events: list[dict] = []
    report = run_pipeline(spec, tmp_path, on_event=events.append)

    assert [s["name"] for s in report["stages"]] == [
        "data", "teacher", "baseline", "distill", "census", "export"
    ]  # fmt: skip
    record = next(s for s in report["stages"] if s["name"] == "census")
    on_file = json.loads((tmp_path / "census.json").read_text())
    assert record["metrics"] == on_file and on_file["params"] > 0
    listed = {a["name"]: a for a in report["artifacts"]}
    body = (tmp_path / "census.json").read_bytes()
    assert listed["census.json"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert ("census", "running") in [
        (e["stage"], e["status"]) for e in events if e["type"] == "stage"
    ]

    # Run again over the same folder: every stage, the new one too, resumes from its record.
    report = run_pipeline(spec, tmp_path)
    assert census == [False, True]
    assert "census.json" in {a["name"] for a in report["artifacts"]}


def test_stage_names_are_unique_and_positions_must_exist():
    with pytest.raises(ValueError, match="registered twice"):
        STAGES.register("distill")(lambda state, ctx, resumed: {})
    with pytest.raises(UnknownName, match="unknown stage 'nowhere'"):
        STAGES.register("x", after="nowhere")


def test_every_export_format_a_spec_can_name_has_an_exporter():
    assert set(get_args(ExportFormat)) == set(EXPORTERS.names())
