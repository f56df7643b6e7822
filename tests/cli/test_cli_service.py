"""The CLI as a user's CI runs it: subprocesses against a live `distillery serve`."""

import hashlib
import json

import numpy as np
import pytest

from app.testing import LEARNING_SPEC
from tests.service_support import (
    REPO,
    TINY_SPEC,
    client,
    free_port,
    result_of,
    run_cli,
    wait_until,
)


def job_ids(served) -> set[str]:
    with client(served[0], served[1]) as c:
        return {j["id"] for j in c.get("/v1/jobs", params={"limit": 200}).json()["data"]}


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "tiny.json"
    path.write_text(json.dumps(TINY_SPEC))
    return path


@pytest.fixture(scope="module")
def finished_job(served, tmp_path_factory):
    """A job whose models learn (LEARNING_SPEC), gated where a model at chance (accuracy drop
    ~0.8) or one pruning did not shrink (4.4x) would fail."""
    path = tmp_path_factory.mktemp("specs") / "learning.json"
    path.write_text(json.dumps(LEARNING_SPEC))
    code, out, err = run_cli(
        served,
        "submit",
        str(path),
        "--wait",
        "--json",
        "--gate",
        "final.size_ratio>=6",
        "--gate",
        "final.accuracy_drop<=0.25",
    )
    assert code == 0, err
    return result_of(out)


def test_submit_wait_passes_gates_and_exits_0(finished_job):
    assert finished_job["job"]["status"] == "succeeded"
    gates = finished_job["gates"]
    assert [g["gate"] for g in gates] == ["final.size_ratio>=6", "final.accuracy_drop<=0.25"]
    assert all(g["passed"] for g in gates) and finished_job["gates_passed"] is True
    final = finished_job["job"]["metrics"]["final"]
    assert [g["value"] for g in gates] == [final["size_ratio"], final["accuracy_drop"]]


def test_human_output_shows_the_metrics_table_and_each_gate(served, finished_job):
    job_id = finished_job["job"]["id"]
    code, out, err = run_cli(
        served, "wait", job_id, "--gate", "final.accuracy>=1.5", "--gate", "teacher.params>0"
    )
    assert code == 1, err  # accuracy can never reach 1.5: that gate fails
    assert "teacher" in out and "quantized" in out and "latency ms" in out
    assert "gate final.accuracy>=1.5:" in out and out.count("FAIL") == 1
    assert "gate teacher.params>0:" in out and "pass" in out


def test_a_failed_job_exits_2_with_its_error_and_logs_end_with_it(served, spec_file, tmp_path):
    # MNIST is not in the service's data root and downloads are off: the job fails at run time.
    bad = {**TINY_SPEC, "dataset": {"source": "torchvision", "name": "MNIST", "max_samples": 100}}
    path = tmp_path / "mnist.json"
    path.write_text(json.dumps(bad))
    code, out, err = run_cli(served, "submit", str(path), "--wait", "--json")
    assert code == 2
    job = result_of(out)["job"]
    assert (
        job["error"]["code"] == "invalid_dataset" and "MNIST not found" in job["error"]["message"]
    )
    code, out, _ = run_cli(served, "logs", job["id"])
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("error [invalid_dataset]: MNIST not found")


def test_the_specs_gates_and_the_flags_are_one_verdict(served, tmp_path):
    """A spec whose own gate fails makes `submit --wait` exit 1 (it once exited 0 while
    report.json said gates_passed: false); each gate is printed with its value."""
    spec = {**TINY_SPEC, "gates": {"min_size_ratio": 1e9, "max_accuracy_drop": 0.9}}
    path = tmp_path / "gated.json"
    path.write_text(json.dumps(spec))
    code, out, err = run_cli(served, "submit", str(path), "--wait", "--gate", "final.params>0")
    assert code == 1, err
    assert "gate final.size_ratio>=1e+09:" in out and "FAIL" in out
    assert "gate final.accuracy_drop<=0.9:" in out and "gate final.params>0:" in out
    gate_lines = [line for line in out.splitlines() if line.startswith("gate ")]
    assert [line.split()[-1] for line in gate_lines].count("pass") == 2
    assert sum("FAIL" in line for line in gate_lines) == 1
    job_id = next(line.split()[0] for line in out.splitlines() if line.startswith("job_"))
    code, out, _ = run_cli(served, "wait", job_id, "--json")
    result = result_of(out)
    assert code == 1 and result["gates_passed"] is False
    assert result["job"]["gates_passed"] is False
    assert [g["gate"] for g in result["gates"]] == [
        "final.accuracy_drop<=0.9",
        "final.size_ratio>=1e+09",
    ]


def test_a_refused_spec_exits_2_naming_the_field(served, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"student": {"arch": "nope"}}))
    code, _, err = run_cli(served, "submit", str(path), "--wait")
    assert code == 2 and "error [invalid_spec]: student.arch" in err and "Traceback" not in err


def test_timeout_exits_3_and_the_job_can_be_cancelled(served, tmp_path):
    slow = {**TINY_SPEC, "teacher": {"arch": "cnn_small", "epochs": 500}}
    path = tmp_path / "slow.json"
    path.write_text(json.dumps(slow))
    code, out, err = run_cli(served, "submit", str(path), "--wait", "--timeout", "2", "--json")
    assert code == 3 and "timeout" in err
    job_id = result_of(out)["job"]["id"]
    code, out, _ = run_cli(served, "cancel", job_id)
    assert code == 0 and job_id in out
    with client(served[0], served[1]) as c:
        wait_until(
            lambda: c.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled", 60, what="cancel"
        )


def test_unreachable_service_or_bad_key_exits_4(served, spec_file):
    code, _, err = run_cli(served, "submit", str(spec_file), url=f"http://127.0.0.1:{free_port()}")
    assert code == 4 and "cannot reach" in err
    code, _, err = run_cli(served, "list", key="dk_wrong")
    assert code == 4 and "error [unauthorized]" in err


@pytest.mark.parametrize(
    "gate,message",
    [
        ("final.accuracy=>0.9", "expected MODEL.METRIC OP NUMBER"),
        ("final.acuracy>=0.9", "final has no metric 'acuracy'"),  # a typo, not a failed gate
    ],
)
def test_a_bad_gate_is_refused_before_anything_is_sent(served, spec_file, gate, message):
    before = job_ids(served)
    code, _, err = run_cli(served, "submit", str(spec_file), "--wait", "--gate", gate)
    assert code == 5 and message in err, err
    assert job_ids(served) == before  # nothing was submitted


def test_input_the_cli_cannot_use_exits_5_never_1(served, tmp_path, finished_job):
    job_id = finished_job["job"]["id"]
    cases = [
        (("submit", "-"), "{not json", "spec - is not valid JSON"),
        (("submit", str(tmp_path / "missing.json")), None, "cannot read spec"),
        (("download", job_id, "model.nothing"), None, "has no artifact 'model.nothing'"),
        (("status", "job_doesnotexist"), None, "error [job_not_found]"),
        (("models", "upload", __file__, "--arch-kwargs", "{"), None, "--arch-kwargs: not valid"),
        (("submit",), None, "Missing argument"),
    ]
    for args, stdin, message in cases:
        code, out, err = run_cli(served, *args, stdin=stdin)
        assert code == 5 and message in err, (args, code, out, err)
        assert "Traceback" not in err


def test_download_verifies_and_resumes(served, finished_job, tmp_path):
    job_id = finished_job["job"]["id"]
    code, out, err = run_cli(served, "download", job_id, "--out", str(tmp_path / "all"), "--json")
    assert code == 0, err
    got = {d["name"]: d for d in json.loads(out)}
    assert {"model.onnx", "model.int8.onnx", "model_card.json", "report.json"} <= set(got)
    for d in got.values():
        assert (
            hashlib.sha256((tmp_path / "all" / d["name"]).read_bytes()).hexdigest() == d["sha256"]
        )

    # An interrupted download left the first half: the next run fetches only the rest.
    whole = (tmp_path / "all" / "model.onnx").read_bytes()
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / "model.onnx.part").write_bytes(whole[: len(whole) // 2])
    code, out, err = run_cli(served, "download", job_id, "model.onnx", "--out", str(resume_dir))
    assert code == 0, err
    assert f"resumed at byte {len(whole) // 2}" in out
    assert (resume_dir / "model.onnx").read_bytes() == whole and not (
        resume_dir / "model.onnx.part"
    ).exists()

    # A corrupt partial file fails the sha256 check and is fetched again whole.
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "model.onnx.part").write_bytes(b"\0" * (len(whole) // 2))
    code, out, err = run_cli(served, "download", job_id, "model.onnx", "--out", str(bad_dir))
    assert code == 0, err
    assert (bad_dir / "model.onnx").read_bytes() == whole

    # `final`: the final model's file, whichever it is.
    int8_won = finished_job["job"]["metrics"]["final"]["model"] == "quantized"
    final = ["model.int8.onnx" if int8_won else "model.onnx"]
    code, out, err = run_cli(
        served, "download", job_id, "final", "--out", str(tmp_path / "f"), "--json"
    )
    assert code == 0, err
    assert [d["name"] for d in json.loads(out)] == final
    assert (tmp_path / "f" / final[0]).read_bytes() == (tmp_path / "all" / final[0]).read_bytes()


def test_status_list_and_logs(served, finished_job):
    job_id = finished_job["job"]["id"]
    code, out, _ = run_cli(served, "status", job_id, "--json")
    assert code == 0 and json.loads(out)["status"] == "succeeded"
    code, out, _ = run_cli(served, "list", "--json", "--limit", "50")
    assert code == 0 and job_id in [j["id"] for j in json.loads(out)["data"]]
    code, out, _ = run_cli(served, "logs", job_id)
    assert code == 0
    for line in (
        "status queued",
        "status running",
        "stage teacher succeeded",
        "quantized: accuracy",
        "status succeeded",
    ):
        assert line in out, line


def test_history_prints_every_epoch_as_a_table_json_or_csv(served, finished_job):
    job_id = finished_job["job"]["id"]
    code, out, err = run_cli(served, "history", job_id, "--json")
    assert code == 0, err
    rows = json.loads(out)["data"]
    spec = LEARNING_SPEC  # what finished_job ran
    epochs = [
        ("teacher", spec["teacher"]["epochs"]),
        ("baseline", spec["distill"]["epochs"]),
        ("distill", spec["distill"]["epochs"]),
        ("finetune1", spec["prune"]["finetune_epochs"]),
    ]
    assert [(r["run"], r["epoch"]) for r in rows] == [
        (run, k) for run, n in epochs for k in range(1, n + 1)
    ]
    code, out, _ = run_cli(served, "history", job_id, "--csv")
    assert code == 0 and out.splitlines()[0].startswith("stage,run,epoch,step,lr,loss,")
    assert len(out.splitlines()) == 1 + len(rows)
    code, out, _ = run_cli(served, "history", job_id)
    assert code == 0
    table = [line for line in out.splitlines() if "finetune1" in line]
    # The last fine-tune epoch's loss, as the table prints it.
    assert len(table) == epochs[-1][1] and f"{rows[-1]['loss']:.4f}" in table[-1]
    code, _, err = run_cli(served, "history", "job_nope")
    assert code == 5 and "error [job_not_found]" in err


def test_uploads_from_the_cli_feed_a_job(served, tmp_path):
    import torch

    from worker.pipeline.archs import build_model
    from worker.pipeline.export import export_torchscript

    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = (rng.normal(size=(120, 6)) + y[:, None]).astype(np.float32)
    np.savez(tmp_path / "rows.npz", x=x, y=y)
    code, out, err = run_cli(served, "datasets", "upload", str(tmp_path / "rows.npz"), "--json")
    assert code == 0, err
    ds = json.loads(out)
    assert ds["num_classes"] == 3 and ds["input_shape"] == [6]
    teacher = build_model("mlp", (6,), 3).eval()
    export_torchscript(teacher, torch.zeros(1, 6), tmp_path / "teacher.pt")
    code, out, err = run_cli(
        served,
        "models",
        "upload",
        str(tmp_path / "teacher.pt"),
        "--input-shape",
        "6",
        "--num-classes",
        "3",
        "--json",
    )
    assert code == 0, err
    model = json.loads(out)
    spec = {
        "dataset": {"source": "upload", "id": ds["id"]},
        "teacher": {"source": "upload", "id": model["id"]},
        "student": {"arch": "mlp_small"},
        "distill": {"epochs": 3},
        "prune": None,
        "quantize": {"method": "int8_dynamic"},
        "evaluate": {"latency_runs": 5, "latency_warmup": 1},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code, out, err = run_cli(
        served,
        "submit",
        str(tmp_path / "spec.json"),
        "--wait",
        "--json",
    )
    assert code == 0, (out, err)
    assert result_of(out)["job"]["metrics"]["teacher"]["params"] > 0


def test_repo_examples_are_valid_specs():
    from worker.pipeline.spec import JobSpec

    for path in sorted((REPO / "examples").glob("*.json")):
        JobSpec.model_validate_json(path.read_text())
