"""A whole job end to end on tiny data: the metrics contract, artifacts, resume, and the CLI."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.testing import LEARNING_SPEC
from worker.pipeline.data import load_dataset
from worker.pipeline.errors import Cancelled, SpecError
from worker.pipeline.evaluate import onnx_logits
from worker.pipeline.export import read_safetensors_meta
from worker.pipeline.limits import DataSettings, SpecLimits
from worker.pipeline.runner import run_pipeline
from worker.pipeline.spec import BuiltinDataset, JobSpec
from worker.pipeline.teacher import load_safetensors, load_torchscript

# Models that learn, so the gates can fail: a model at chance misses the accuracy gate, one
# that pruning did not shrink misses the size gate (see LEARNING_SPEC).
TINY = {**LEARNING_SPEC, "name": "tiny", "gates": {"max_accuracy_drop": 0.25, "min_size_ratio": 6}}
MODELS = ("teacher", "baseline", "student", "pruned", "quantized")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    events = []
    report = run_pipeline(JobSpec.model_validate(TINY), out, on_event=events.append)
    return out, report, events


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Measured here, with ONNX Runtime directly: not with the pipeline's own evaluator."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(1) == y).mean())


def test_report_holds_the_metrics_contract(finished):
    out, report, _ = finished
    assert json.loads((out / "report.json").read_text()) == report
    metrics = report["metrics"]
    for key in MODELS:
        assert set(metrics[key]) >= {"accuracy", "params", "size_bytes", "latency_ms"}, key
        assert metrics[key]["latency_ms"] > 0
    # Every reported accuracy and size is what the model files give on the held-out split.
    data = load_dataset(BuiltinDataset(max_samples=300), seed=0)
    x, y = data.x_test.numpy(), data.y_test.numpy()
    files = {
        "teacher": out / ".work/teacher.onnx",
        "baseline": out / ".work/baseline.onnx",
        "student": out / ".work/student.onnx",
        "quantized": out / "model.int8.onnx",
    }
    measured = {k: _accuracy(path, x, y) for k, path in files.items()}
    for key, path in files.items():
        assert metrics[key]["accuracy"] == pytest.approx(measured[key]), key
        assert metrics[key]["size_bytes"] == path.stat().st_size, key
    final = metrics["final"]
    assert final["model"] == "quantized" and final["accuracy"] == pytest.approx(
        measured["quantized"]
    )
    assert final["accuracy_drop"] == pytest.approx(measured["teacher"] - measured["quantized"])
    sizes = {k: path.stat().st_size for k, path in files.items()}
    assert final["size_ratio"] == pytest.approx(sizes["teacher"] / sizes["quantized"])
    assert final["distill_gain"] == pytest.approx(measured["student"] - measured["baseline"])
    assert metrics["pruned"]["params"] < metrics["student"]["params"]
    assert [s["name"] for s in report["stages"]] == [
        "data",
        "teacher",
        "baseline",
        "distill",
        "prune",
        "quantize",
        "export",
    ]
    assert all(s["seconds"] > 0 and s["status"] == "succeeded" for s in report["stages"])
    # The gates a model at chance or an unshrunk one would fail, passed with their values.
    assert report["gates"] == [
        {
            "gate": "final.accuracy_drop<=0.25",
            "name": "max_accuracy_drop",
            "value": final["accuracy_drop"],
            "passed": True,
        },
        {
            "gate": "final.size_ratio>=6",
            "name": "min_size_ratio",
            "value": final["size_ratio"],
            "passed": True,
        },
    ]


def test_artifacts_are_listed_with_their_sha256(finished):
    out, report, _ = finished
    names = [a["name"] for a in report["artifacts"]]
    assert sorted(names) == [
        "history.csv",
        "model.int8.onnx",
        "model.onnx",
        "model.safetensors",
        "model.torchscript.pt",
        "model_card.json",
        "profile.json",
    ]
    for a in report["artifacts"]:
        body = (out / a["name"]).read_bytes()
        assert a["sha256"] == hashlib.sha256(body).hexdigest() and a["bytes"] == len(body)
    # int8 won here (the report's final model is `quantized`): its file is the final one.
    assert [a["name"] for a in report["artifacts"] if a["final"]] == ["model.int8.onnx"]
    card = json.loads((out / "model_card.json").read_text())
    assert [a["name"] for a in card["artifacts"] if a["final"]] == ["model.int8.onnx"]
    assert {a["name"]: a["sha256"] for a in card["artifacts"]} == {
        a["name"]: a["sha256"] for a in report["artifacts"] if a["name"] != "model_card.json"
    }
    assert card["spec"]["student"]["arch"] == "cnn_tiny"
    contract = card["input"]
    assert (
        contract["name"] == "input"
        and contract["shape"] == ["batch", 1, 8, 8]
        and contract["dtype"] == "float32"
    )
    assert (
        contract["scale"] == 1 / 16
        and len(contract["mean"]) == 1
        and len(contract["class_names"]) == 10
    )


def test_exported_formats_agree_with_each_other(finished):
    """The safetensors file rebuilds the pruned model from arch + recorded layer shapes."""
    out, report, _ = finished
    data = load_dataset(BuiltinDataset(max_samples=300), seed=0)
    meta = read_safetensors_meta(out / "model.safetensors")
    assert JobSpec.model_validate_json(meta["spec"]).name == "tiny"
    rebuilt = load_safetensors(
        out / "model.safetensors", meta["arch"], json.loads(meta["arch_kwargs"]), data
    )
    scripted = load_torchscript(out / "model.torchscript.pt")
    ref = onnx_logits(out / "model.onnx", data.x_test)
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt(data.x_test).numpy(), ref, atol=1e-4)
        np.testing.assert_allclose(scripted(data.x_test).numpy(), ref, atol=1e-4)
    int8 = onnx_logits(out / "model.int8.onnx", data.x_test)
    assert (int8.argmax(1) == ref.argmax(1)).mean() >= 0.95


def test_progress_is_monotonic_and_ends_at_one(finished):
    _, _, events = finished
    progress = [e["progress"] for e in events if e["type"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    stages = [(e["stage"], e["status"]) for e in events if e["type"] == "stage"]
    assert stages[0] == ("data", "running") and stages[-1] == ("export", "succeeded")
    assert stages[2] == ("teacher", "running")  # after the data stage's end


COLUMNS = "stage,run,epoch,step,lr,loss,task_loss,kd_loss,feature_loss,val_accuracy,seconds"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_epoch_of_every_training_run_is_a_history_row(finished):
    out, report, events = finished
    rows = [e["row"] for e in events if e["type"] == "history"]
    epochs = {
        "teacher": TINY["teacher"]["epochs"],
        "baseline": TINY["distill"]["epochs"],
        "distill": TINY["distill"]["epochs"],
        "finetune1": TINY["prune"]["finetune_epochs"],
    }
    stage = {
        "teacher": "teacher",
        "baseline": "baseline",
        "distill": "distill",
        "finetune1": "prune",
    }
    assert [(r["stage"], r["run"], r["epoch"]) for r in rows] == [
        (stage[run], run, k) for run, n in epochs.items() for k in range(1, n + 1)
    ]
    # Optimizer steps: ceil(train samples / batch size) per epoch; every run trains with 32.
    per_epoch = -(-report["dataset"]["num_train"] // 32)
    assert [r["step"] for r in rows] == [per_epoch * r["epoch"] for r in rows]
    # The loss parts are the epoch means the progress lines print (to their 4 decimals).
    printed = [e["message"] for e in events if e["type"] == "progress" and "loss=" in e["message"]]
    assert [m.split("loss=")[1].split()[0] for m in printed] == [f"{r['loss']:.4f}" for r in rows]
    with_teacher = {"distill", "finetune1"}
    assert all((r["kd_loss"] is not None) == (r["run"] in with_teacher) for r in rows)
    assert all(r["task_loss"] > 0 and r["lr"] > 0 and r["feature_loss"] is None for r in rows)
    for run in ("teacher", "distill"):
        seconds = [r["seconds"] for r in rows if r["run"] == run]
        assert seconds == sorted(seconds) and seconds[0] > 0
    # Validation accuracy after the last epoch is what the student selection measured.
    distill = next(s for s in report["stages"] if s["name"] == "distill")["metrics"]
    last = {r["run"]: r for r in rows}
    assert last["distill"]["val_accuracy"] == pytest.approx(distill["val_accuracy_distilled"])
    assert last["baseline"]["val_accuracy"] == pytest.approx(distill["val_accuracy_baseline"])
    # history.csv holds the same rows, in this column order.
    assert (out / "history.csv").read_text().splitlines()[0] == COLUMNS
    on_file = _csv_rows(out / "history.csv")
    assert [(r["run"], int(r["epoch"]), float(r["loss"])) for r in on_file] == [
        (r["run"], r["epoch"], pytest.approx(r["loss"])) for r in rows
    ]
    assert on_file[0]["kd_loss"] == "" and float(on_file[-1]["kd_loss"]) > 0


def test_a_stage_run_again_after_a_crash_has_one_row_per_epoch(tmp_path, monkeypatch):
    """The baseline trains, then its measurement crashes: the job runs again, trains the
    baseline again from its first epoch, and its rows replace the first attempt's."""
    from worker.pipeline.state import JobState

    spec = JobSpec.model_validate(
        {**TINY, "teacher": {"arch": "cnn_tiny", "epochs": 2}, "distill": {"epochs": 3}}
        | {"prune": None, "quantize": None}
    )
    measure = JobState.measure_module

    def crash_on_baseline(self, key, model):
        if key == "baseline":
            raise RuntimeError("lost the disk")
        return measure(self, key, model)

    monkeypatch.setattr(JobState, "measure_module", crash_on_baseline)
    first: list[dict] = []
    with pytest.raises(RuntimeError, match="lost the disk"):
        run_pipeline(spec, tmp_path, on_event=first.append)
    monkeypatch.setattr(JobState, "measure_module", measure)
    second: list[dict] = []
    run_pipeline(spec, tmp_path, on_event=second.append)

    assert [e["row"]["run"] for e in first if e["type"] == "history"] == ["teacher"] * 2 + [
        "baseline"
    ] * 3
    again = [e["row"] for e in second if e["type"] == "history"]
    assert [(r["run"], r["epoch"]) for r in again] == [("baseline", k) for k in (1, 2, 3)] + [
        ("distill", k) for k in (1, 2, 3)
    ]
    on_file = [
        (r["run"], int(r["epoch"]), r["seconds"]) for r in _csv_rows(tmp_path / "history.csv")
    ]
    assert [(run, epoch) for run, epoch, _ in on_file] == [("teacher", 1), ("teacher", 2)] + [
        (run, k) for run in ("baseline", "distill") for k in (1, 2, 3)
    ]
    # The baseline's rows on file are the second attempt's.
    assert [float(s) for run, _, s in on_file if run == "baseline"] == [
        pytest.approx(r["seconds"]) for r in again if r["run"] == "baseline"
    ]


def test_a_run_resumed_mid_way_adds_only_the_epochs_it_runs(tmp_path):
    teacher = {**TINY["teacher"], "epochs": 4}
    spec = JobSpec.model_validate(
        {**TINY, "teacher": teacher, "distill": {"epochs": 3}, "prune": None}
    )
    seen: list[tuple[str, int]] = []

    def on_event(e):
        if e["type"] == "history":
            seen.append((e["row"]["run"], e["row"]["epoch"]))

    with pytest.raises(Cancelled):
        run_pipeline(
            spec, tmp_path, on_event=on_event, should_cancel=lambda: ("distill", 1) in seen
        )
    assert seen[-1] == ("distill", 1)
    seen.clear()
    run_pipeline(spec, tmp_path, on_event=on_event)
    assert seen == [("distill", 2), ("distill", 3)]  # epoch 1 came from its checkpoint
    rows = _csv_rows(tmp_path / "history.csv")
    distill = [r for r in rows if r["run"] == "distill"]
    assert [int(r["epoch"]) for r in distill] == [1, 2, 3]
    # The run's clock goes on across the resume.
    assert float(distill[0]["seconds"]) < float(distill[1]["seconds"])
    assert len(rows) == 4 + 3 + 3  # teacher, baseline, distill


def test_an_interrupted_job_resumes_after_its_last_finished_stage(tmp_path):
    spec = JobSpec.model_validate({**TINY, "distill": {"epochs": 4}, "prune": None})
    done = []

    def on_event(e):
        if e["type"] == "stage" and e["status"] == "succeeded":
            done.append(e["stage"])

    with pytest.raises(Cancelled):
        run_pipeline(spec, tmp_path, on_event=on_event, should_cancel=lambda: "distill" in done)
    first = json.loads((tmp_path / ".work/state/distill.json").read_text())

    events = []
    report = run_pipeline(spec, tmp_path, on_event=events.append)
    resumed = [e["stage"] for e in events if e["type"] == "stage" and e.get("resumed")]
    ran = [e["stage"] for e in events if e["type"] == "stage" and e["status"] == "running"]
    # The data is read again by every attempt (an image cache is reused, not rebuilt).
    assert resumed == ["teacher", "baseline", "distill"] and ran == ["data", "quantize", "export"]
    # The resumed stages' numbers are the recorded ones, and nothing was trained twice.
    assert report["metrics"]["student"] == first["models"]["student"]
    assert len(report["artifacts"]) == len({a["name"] for a in report["artifacts"]})
    assert not list((tmp_path / ".work/checkpoints").rglob("*.pt"))


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_final_models_operator_profile_is_an_artifact(finished):
    """profile.json: ONNX Runtime's profiler on the final model, time per operator type; the
    op types are those of the model's graph (after ONNX Runtime's fusions, so a subset plus
    what it inserts) and the shares add up to 1."""
    import onnx

    out, report, _ = finished
    profile = json.loads((out / "profile.json").read_text())
    assert profile["key"] == report["metrics"]["final"]["model"] and profile["runs"] > 0
    path = next(p for p in (out / ".work", out) if (p / profile["model"]).exists())
    graph_ops = {n.op_type for n in onnx.load(str(path / profile["model"])).graph.node}
    # What ONNX Runtime runs: the graph's ops, or what it fused them into.
    assert set(profile) and {o["op_type"] for o in profile["ops"]} & (
        graph_ops | {"QLinearConv", "QGemm", "FusedConv"}
    )
    assert all(o["us_per_run"] > 0 and o["nodes"] >= 1 for o in profile["ops"])
    assert abs(sum(o["share"] for o in profile["ops"]) - 1.0) < 1e-6
    assert report["speed"]["cpu"]["weight_bits"] in (7, 8)


def test_min_speedup_fails_when_the_interval_says_not_faster(tmp_path):
    """`distillery run` of a job whose student is the teacher's own arch: the two run alike,
    whatever two medians taken apart say, so `min_speedup: 1.3` must fail on the interval; the
    report says the CPU's int8 capability and whether int8 paid; profile.json is handed over."""
    from app.testing import TINY_SPEC

    repo = Path(__file__).parents[3]
    spec = {
        **TINY_SPEC,
        "student": {"arch": "cnn_tiny"},  # = the teacher's
        "prune": None,
        "quantize": {"method": "int8_static", "calibration_samples": 32, "weight_bits": 7},
        "evaluate": {"latency_runs": 5, "latency_warmup": 1, "compare_rounds": 8},
        "gates": {"min_speedup": 1.3},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = _cli("run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "out"), "--json", cwd=repo)
    assert r.returncode == 1, r.stderr  # it ran, and the gate failed
    report = json.loads(r.stdout)
    final = report["metrics"]["final"]
    [gate] = report["gates"]
    assert gate["gate"] == "final.speedup_lower>=1.3" and gate["passed"] is False
    assert gate["value"] == final["speedup_ci"][0] < 1.3
    assert report["speed"]["cpu"]["flags"].keys() == {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"}
    int8 = report["speed"]["int8"]
    assert int8["pays"] is True or int8["why"]
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["quantize"] == {
        "method": "int8_static",
        "calibration": "minmax",
        "weight_bits": 7,
        "weight_bits_from": "spec",
    }
    assert "profile.json" in {a["name"] for a in report["artifacts"]}
    assert json.loads((tmp_path / "out" / "profile.json").read_text())["ops"]


def test_cli_runs_a_job_and_uses_exit_codes(tmp_path):
    repo = Path(__file__).parents[3]
    small = {
        **TINY,
        "distill": {"epochs": 2},
        "prune": None,
        "teacher": {"arch": "cnn_tiny", "epochs": 2},
        "gates": {"min_size_ratio": 1e9},
    }
    (tmp_path / "spec.json").write_text(json.dumps(small))
    r = _cli("run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "out"), "--json", cwd=repo)
    assert r.returncode == 1, r.stderr  # it ran, and the impossible gate failed
    report = json.loads(r.stdout)
    assert report["gates"][0]["passed"] is False and (tmp_path / "out/model.int8.onnx").exists()

    (tmp_path / "bad.json").write_text(json.dumps({"student": {"arch": "nope"}}))
    r = _cli("run", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o2"), cwd=repo)
    assert (
        r.returncode == 2
        and "error [invalid_spec]: student.arch: Value error, unknown arch 'nope'" in r.stderr
    )
    assert "Traceback" not in r.stderr

    missing = {**small, "dataset": {"source": "npz", "path": str(tmp_path / "nothere.npz")}}
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    r = _cli("run", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o3"), cwd=repo)
    assert (
        r.returncode == 2
        and "error [invalid_dataset]" in r.stderr
        and "nothere.npz: no such file" in r.stderr
    )


def test_a_crash_in_distillery_run_is_one_error_line_and_exit_2(tmp_path):
    """Not a PipelineError (here: the output folder cannot be made, a file is in the way):
    still `error [code]: message` and exit 2, never a traceback unless --debug asks."""
    repo = Path(__file__).parents[3]
    (tmp_path / "spec.json").write_text(json.dumps(TINY))
    (tmp_path / "file").write_text("in the way")
    args = ("run", str(tmp_path / "spec.json"), "--out", str(tmp_path / "file" / "out"))
    r = _cli(*args, cwd=repo)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error [internal_error]: ")
    assert "Traceback" not in r.stderr
    r = _cli(*args, "--debug", cwd=repo)
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("keep", ["better", "distilled"])
def test_a_teacher_that_hurts_is_caught_by_the_baseline(tmp_path, keep):
    """An untrained teacher teaches noise: the student trained alone scores higher on the
    validation split and goes on to pruning, and the report says so."""
    from worker.pipeline.archs import build_model
    from worker.pipeline.export import export_safetensors

    torch.manual_seed(123)
    noise = export_safetensors(
        build_model("cnn_small", (1, 8, 8), 10),
        tmp_path / "noise.safetensors",
        arch="cnn_small",
        arch_kwargs={},
    )
    spec = JobSpec.model_validate(
        {
            **TINY,
            "teacher": {"source": "safetensors", "path": str(noise), "arch": "cnn_small"},
            "distill": {"epochs": 6, "alpha": 1.0, "keep": keep},
            "prune": None,
        }
    )
    report = run_pipeline(spec, tmp_path / keep)
    distill = next(s for s in report["stages"] if s["name"] == "distill")["metrics"]
    final = report["metrics"]["final"]
    assert distill["kept"] == final["student_kept"]
    if keep == "better":
        assert distill["val_accuracy_baseline"] > distill["val_accuracy_distilled"]
        assert final["student_kept"] == "baseline"
    else:
        assert final["student_kept"] == "distilled" and "val_accuracy_baseline" not in distill
    # The int8 model descends from the kept student: it agrees with that student's predictions.
    assert (
        abs(
            report["metrics"]["quantized"]["accuracy"]
            - report["metrics"]["baseline" if final["student_kept"] == "baseline" else "student"][
                "accuracy"
            ]
        )
        < 0.05
    )


# --- the preflight: what can fail before compute fails before the teacher trains -----------

TYPO = {"student_layer": "features.9", "teacher_layer": "features.1"}
LAYER_TYPO = {**TINY, "distill": {"epochs": 1, "feature": TYPO}}
TOO_DEEP = {**TINY, "student": {"arch": "mlp", "arch_kwargs": {"hidden": [1] * 20_000}}}


def test_a_feature_layer_typo_fails_before_the_teacher_trains(tmp_path):
    events = []
    with pytest.raises(SpecError) as e:
        run_pipeline(JobSpec.model_validate(LAYER_TYPO), tmp_path, on_event=events.append)
    assert e.value.code == "invalid_spec"
    assert e.value.message.startswith(
        "distill.feature.student_layer: no layer 'features.9'; layers: features, features.0"
    )
    # Only the data was read (the preflight needs its shape): no model stage started.
    assert {ev["stage"] for ev in events if ev["type"] == "stage"} == {"data"}
    assert not (tmp_path / ".work/state/teacher.json").exists()


def test_a_spec_past_the_limits_fails_before_the_data_is_loaded(tmp_path):
    events = []
    with pytest.raises(SpecError, match=r"^student\.arch_kwargs\.hidden: a list of 20000 items"):
        run_pipeline(JobSpec.model_validate(TOO_DEEP), tmp_path, on_event=events.append)
    assert events == []
    with pytest.raises(SpecError, match=r"^student\.arch: 'cnn_tiny' builds \d+ layers"):
        run_pipeline(JobSpec.model_validate(TINY), tmp_path, limits=SpecLimits(max_layers=2))


def test_cli_refuses_what_the_preflight_refuses_with_exit_2(tmp_path):
    repo = Path(__file__).parents[3]
    for name, spec, message in (
        ("typo", LAYER_TYPO, "distill.feature.student_layer: no layer 'features.9'; layers: "),
        ("deep", TOO_DEEP, "student.arch_kwargs.hidden: a list of 20000 items; at most 64"),
    ):
        (tmp_path / f"{name}.json").write_text(json.dumps(spec))
        out = tmp_path / name
        r = _cli("run", str(tmp_path / f"{name}.json"), "--out", str(out), cwd=repo)
        assert r.returncode == 2 and f"error [invalid_spec]: {message}" in r.stderr, r.stderr
        assert "✓ teacher" not in r.stderr and not (out / ".work/state/teacher.json").exists()


def test_final_is_the_best_model_by_the_objective_not_the_last_stage(tmp_path):
    """On this tiny student the int8 file comes out bigger than the pruned float one (QDQ
    nodes outweigh the weights): a plain job must not hand it over as `final` for size."""
    from app.testing import TINY_SPEC

    report = run_pipeline(JobSpec.model_validate(TINY_SPEC), tmp_path / "size")
    m = report["metrics"]
    assert m["quantized"]["size_bytes"] > m["pruned"]["size_bytes"]  # the case in point
    assert m["final"]["model"] == "pruned"
    # The file to deploy is then the float export, not the int8 file the job also keeps.
    assert [a["name"] for a in report["artifacts"] if a["final"]] == ["model.onnx"]
    assert "not smaller than the model they came from" in m["final"]["reason"]
    assert m["final"]["accuracy_drop_ci"][0] <= m["final"]["accuracy_drop"]
    by_accuracy = run_pipeline(
        JobSpec.model_validate({**TINY_SPEC, "objective": "accuracy"}), tmp_path / "acc"
    )["metrics"]
    kept = "baseline" if by_accuracy["final"]["student_kept"] == "baseline" else "student"
    # Whatever the objective, a compression proven slower than its parent is left out.
    speed = json.loads((tmp_path / "acc" / "report.json").read_text())["speed"]["comparisons"]
    slower = {
        k for k, c in speed.items() if c.get("parent", {}).get("b1", {}).get("verdict") == "slower"
    }
    best = max(
        (k for k in (kept, "pruned", "quantized") if k not in slower),
        key=lambda k: (by_accuracy[k]["accuracy"], -by_accuracy[k]["size_bytes"]),
    )
    assert by_accuracy["final"]["model"] == best


def test_an_augmented_job_streamed_through_loader_workers_runs_end_to_end(tmp_path):
    """`distill.augment` through a whole job, its splits read (and augmented) in DataLoader
    workers: distilled, pruned with the augmented fine-tune, quantized, exported."""
    spec = {
        **LEARNING_SPEC,
        "teacher": {**LEARNING_SPEC["teacher"], "epochs": 6},
        "distill": {**LEARNING_SPEC["distill"], "augment": True, "baseline": False},
        "prune": {"amount": 0.3, "finetune_epochs": 2},
    }
    streamed = DataSettings(workers=1, resident_bytes=0)
    report = run_pipeline(JobSpec.model_validate(spec), tmp_path, data_settings=streamed)
    assert report["dataset"]["read_per_batch"]
    assert [s["name"] for s in report["stages"]][:4] == ["data", "teacher", "distill", "prune"]
    # It learned from shifted, flipped digits (chance is 0.1; 0.83 when run resident).
    assert report["metrics"]["student"]["accuracy"] > 0.6
    assert (tmp_path / "model.int8.onnx").exists()
