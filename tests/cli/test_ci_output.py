"""What a CI log shows: `distillery submit --wait` with stderr not a terminal prints plain
timestamped lines, `--json` prints the events as JSON lines then the result, GitHub Actions
gets a Markdown summary, a replayed submit says so, and local files in a spec are uploaded
once. Subprocesses against a live `distillery serve`."""

from __future__ import annotations

import json
import re
from datetime import datetime

import numpy as np
import pytest

from app.testing import LEARNING_SPEC
from tests.service_support import TINY_SPEC, client, result_of, run_cli

STAMP = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)"


@pytest.fixture(scope="module")
def learning_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("ci") / "learning.json"
    path.write_text(json.dumps(LEARNING_SPEC))
    return path


def test_without_a_terminal_wait_prints_plain_stage_lines_and_spaced_progress(
    served, learning_spec
):
    code, out, err = run_cli(
        served, "submit", str(learning_spec), "--wait", "--progress-interval", "1"
    )
    assert code == 0, err
    job_id = re.search(r"submitted (job_\w+)", err).group(1)
    with client(served[0], served[1]) as c:
        stages = [s["name"] for s in c.get(f"/v1/jobs/{job_id}").json()["stages"]]
    started = re.findall(rf"^{STAMP} stage (\w+) started$", err, re.M)
    ended = re.findall(rf"^{STAMP} stage (\w+) succeeded \(\d+\.\ds\)$", err, re.M)
    assert [s for _, s in started] == stages and [s for _, s in ended] == stages
    progress = [
        datetime.fromisoformat(t) for t in re.findall(rf"^{STAMP} progress \d+% ", err, re.M)
    ]
    assert len(progress) >= 2  # the job ran for seconds: more than one line
    gaps = [(b - a).total_seconds() for a, b in zip(progress, progress[1:], strict=False)]
    assert min(gaps) >= 1  # never two progress lines within the interval
    assert "\x1b[" not in err  # no terminal escapes in a log
    assert f"{job_id} learning: succeeded" in out


def test_json_wait_prints_the_events_as_json_lines_then_the_result(served, tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_SPEC))
    code, out, err = run_cli(served, "submit", str(path), "--wait", "--json")
    assert code == 0, err
    *events, last = [json.loads(line) for line in out.strip().splitlines()]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids[:-1])) == len(ids) - 1  # `end` repeats the last
    kinds = {e["type"] for e in events}
    assert {"status", "stage", "progress", "metrics"} <= kinds and events[-1]["type"] == "end"
    assert last["job"]["status"] == "succeeded" and last["replayed"] is False
    assert events[-1]["status"] == "succeeded"


def test_github_actions_gets_a_markdown_summary_appended(served, learning_spec, tmp_path):
    summary = tmp_path / "step_summary.md"
    summary.write_text("# an earlier step\n")
    code, out, err = run_cli(
        served,
        "submit",
        str(learning_spec),
        "--wait",
        "--gate",
        "final.accuracy_drop<=0.25",
        "--gate",
        "final.size_ratio>=1e9",  # no model is a billion times smaller: this one fails
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert code == 1, err
    job_id = re.search(r"submitted (job_\w+)", err).group(1)
    text = summary.read_text()
    assert text.startswith("# an earlier step\n")  # appended, not replaced
    assert f"### Distillery `{job_id}` (learning): succeeded" in text
    assert re.search(r"^\| teacher \| 0\.\d{4} \| [\d,]+ \| [\d.]+ KB \| [\d.]+ \|$", text, re.M)
    assert re.search(r"^\| `final.accuracy_drop<=0.25` \| [\d.e-]+ \| ✅ pass \|$", text, re.M)
    assert re.search(r"^\| `final.size_ratio>=1e9` \| [\d.]+ \| ❌ FAIL \|$", text, re.M)
    with client(served[0], served[1]) as c:
        artifacts = c.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    for a in artifacts:
        assert re.search(rf"^\| `{re.escape(a['name'])}` \| .+ \| `{a['sha256']}` \|$", text, re.M)


def test_a_replayed_submit_says_so(served, tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_SPEC))
    key = ("--idempotency-key", f"ci-{tmp_path.name}")
    code, first, err = run_cli(served, "submit", str(path), *key, "--json")
    assert code == 0 and json.loads(first)["replayed"] is False and "replayed" not in err
    code, again, err = run_cli(served, "submit", str(path), *key)
    job_id = json.loads(first)["id"]
    assert code == 0 and again.strip() == job_id
    assert f"replayed {job_id}" in err
    code, out, err = run_cli(served, "submit", str(path), *key, "--json")
    assert json.loads(out)["replayed"] is True


def test_submit_uploads_the_local_files_a_spec_names_once(served, tmp_path):
    import torch

    from worker.pipeline.archs import build_model
    from worker.pipeline.export import export_torchscript

    rng = np.random.default_rng(1)
    y = np.arange(90) % 3
    x = (rng.normal(size=(90, 5)) + y[:, None]).astype(np.float32)
    np.savez(tmp_path / "rows.npz", x=x, y=y)
    export_torchscript(build_model("mlp", (5,), 3).eval(), torch.zeros(1, 5), tmp_path / "t.pt")
    spec = {
        "dataset": {"source": "npz", "path": str(tmp_path / "rows.npz"), "test_fraction": 0.3},
        "teacher": {"source": "torchscript", "path": str(tmp_path / "t.pt")},
        "student": {"arch": "mlp_small"},
        "distill": {"epochs": 2},
        "prune": None,
        "quantize": {"method": "int8_dynamic"},
        "evaluate": {"latency_runs": 5, "latency_warmup": 1},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    key = ("--idempotency-key", f"files-{tmp_path.name}")
    code, out, err = run_cli(
        served, "submit", str(tmp_path / "spec.json"), *key, "--wait", "--json"
    )
    assert code == 0, err
    ds_id = re.search(r"rows.npz: uploaded as (ds_\w+)", err).group(1)
    model_id = re.search(r"t.pt: uploaded as (mdl_\w+)", err).group(1)
    job = result_of(out)["job"]
    assert (job["spec"]["dataset"]["source"], job["spec"]["dataset"]["id"]) == ("upload", ds_id)
    assert job["spec"]["dataset"]["test_fraction"] == 0.3  # the split settings came along
    assert job["spec"]["teacher"] == {"source": "upload", "id": model_id}
    # The same command again (a retried CI step): nothing uploaded twice, the same job.
    code, again, err = run_cli(served, "submit", str(tmp_path / "spec.json"), *key)
    assert code == 0 and again.strip() == job["id"], err
    assert f"rows.npz: already uploaded as {ds_id}" in err and f"replayed {job['id']}" in err
    code, out, _ = run_cli(served, "datasets", "upload", str(tmp_path / "rows.npz"), "-q")
    assert code == 0 and re.fullmatch(r"ds_[0-9a-f]+\n", out)
    spec["dataset"]["path"] = str(tmp_path / "missing.npz")
    (tmp_path / "missing.json").write_text(json.dumps(spec))
    code, _, err = run_cli(served, "submit", str(tmp_path / "missing.json"))
    assert code == 5 and "dataset.path: no file" in err
