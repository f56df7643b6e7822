"""Search jobs in one process (`run_pipeline` / `distillery run`): the plan, sharing, the
front and the choice checked independently of the code that made them, resume, best effort,
validation and the candidate cap."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

from app.testing import LEARNING_SPEC
from worker.pipeline.errors import Cancelled, SpecError
from worker.pipeline.limits import SpecLimits
from worker.pipeline.runner import run_pipeline
from worker.pipeline.search import plan
from worker.pipeline.spec import JobSpec, format_validation_error

STUDENTS = [{"arch": "cnn_tiny"}, {"arch": "cnn_tiny", "arch_kwargs": {"widths": [8, 16]}}]
SEARCH = {
    **LEARNING_SPEC,
    "name": "search",
    "search": {
        "student": STUDENTS,
        "prune.amount": [0, 0.3, 0.5],
        "quantize.method": [None, "int8_dynamic"],
        "objective": "size",
    },
    "gates": {"max_accuracy_drop": 0.15},
    # Every candidate timed against its parent, interleaved (the never-slower rule).
    "evaluate": {**LEARNING_SPEC["evaluate"], "compare_rounds": 10},
}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    events: list[dict] = []
    report = run_pipeline(JobSpec.model_validate(SEARCH), out, on_event=events.append)
    return out, report, events


def test_the_plan_is_every_combination_with_its_parents():
    p = plan(JobSpec.model_validate(SEARCH))
    # 2 students x 1 recipe x (unpruned, 0.3, 0.5) x (float, int8_dynamic).
    assert p.size == 12 and len(p.candidates()) == 12
    by_key = {c.key: c for c in p.candidates()}
    assert by_key["s1-d0-p0-q0"].parent is None
    assert by_key["s1-d0-p1-q0"].parent == "s1-d0-p0-q0"  # 0.3 from the unpruned model
    assert by_key["s1-d0-p2-q0"].parent == "s1-d0-p1-q0"  # 0.5 from the 0.3 one
    assert by_key["s1-d0-p2-q1"].parent == "s1-d0-p2-q0"  # int8 from its float model
    assert by_key["s0-d0-p2-q1"].axes["prune.amount"] == 0.5


def test_everything_shared_is_made_once(searched):
    _, report, events = searched
    runs = Counter(e["row"]["run"] for e in events if e["type"] == "history")
    epochs = LEARNING_SPEC["teacher"]["epochs"], LEARNING_SPEC["distill"]["epochs"]
    finetune = LEARNING_SPEC["prune"]["finetune_epochs"]
    assert runs == {
        "teacher": epochs[0],  # one teacher for the whole search
        "s0:baseline": epochs[1],  # one baseline per student
        "s1:baseline": epochs[1],
        "s0-d0:distill": epochs[1],  # one distillation per student and recipe
        "s1-d0:distill": epochs[1],
        **{f"s{s}-d0-p{p}-q0:ft1": finetune for s in (0, 1) for p in (1, 2)},  # one per amount
    }
    assert report["search"]["candidates"] == report["search"]["measured"] == 12


def _front(candidates: list[dict]) -> set[str]:
    """Recomputed here: a candidate is on the front unless another is at least as accurate,
    as small and as fast, and better on one of them."""
    out = set()
    for c in candidates:
        m = c["metrics"]
        beaten = any(
            o["metrics"]["accuracy"] >= m["accuracy"]
            and o["metrics"]["size_bytes"] <= m["size_bytes"]
            and o["metrics"]["latency_ms"] <= m["latency_ms"]
            and (o["metrics"]["accuracy"], -o["metrics"]["size_bytes"], -o["metrics"]["latency_ms"])
            != (m["accuracy"], -m["size_bytes"], -m["latency_ms"])
            for o in candidates
        )
        if not beaten:
            out.add(c["key"])
    return out


def test_the_front_and_the_final_follow_the_rules(searched):
    out, report, _ = searched
    candidates = json.loads((out / "candidates.json").read_text())
    assert candidates == report["candidates"]
    assert {c["key"] for c in candidates if c["on_front"]} == _front(candidates)
    by_key = {c["key"]: c for c in candidates}

    def grew(c):  # bigger than any model it came from
        parent = c["parent"]
        while parent is not None:
            if c["metrics"]["size_bytes"] >= by_key[parent]["metrics"]["size_bytes"]:
                return True
            parent = by_key[parent]["parent"]
        return False

    def slower(c):  # proven slower than its parent by the interleaved runs
        return c["metrics"].get("parent_speedup_verdict") == "slower"

    assert all("parent_speedup_ci" in c["metrics"] for c in candidates if c["parent"])
    eligible = [c for c in candidates if not grew(c) and not slower(c)]
    passing = [c for c in eligible if c["metrics"]["accuracy_drop"] <= 0.15]
    assert passing, "the spec's gate is one the search can meet"
    smallest = min(passing, key=lambda c: (c["metrics"]["size_bytes"], -c["metrics"]["accuracy"]))
    final = [c for c in candidates if c["final"]]
    assert [c["key"] for c in final] == [smallest["key"]]
    assert report["gates_passed"] is True and report["metrics"]["final"]["model"] == smallest["key"]
    assert "smallest" in report["metrics"]["final"]["reason"]
    # Intervals: accuracy inside its own, the drop's paired interval around the drop.
    for c in candidates:
        m = c["metrics"]
        assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
        assert m["accuracy_drop_ci"][0] <= m["accuracy_drop"] + 1e-9
        assert m["accuracy_drop"] - 1e-9 <= m["accuracy_drop_ci"][1]
        assert m["latency_b32_ms"] > 0 and m["macs"] > 0


def test_the_chosen_model_and_every_front_candidate_are_handed_over(searched):
    out, report, _ = searched
    listed = {a["name"]: a for a in report["artifacts"]}
    final = report["metrics"]["final"]["model"]
    front = [c["key"] for c in report["candidates"] if c["on_front"]]
    assert {"candidates.json", "pareto.png", "model.onnx", "model_card.json"} <= set(listed)
    assert {f"candidate-{k}.onnx" for k in front} <= set(listed)
    for name, a in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == a["sha256"], name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profile = json.loads((out / "profile.json").read_text())
    assert "profile.json" in listed and profile["key"] == final and profile["ops"]
    # The final's speedup over the teacher has its interval, from runs on this host.
    m = report["metrics"]["final"]
    assert m["speedup_ci"][0] <= m["speedup_ci"][1] and "cpu" in report["speed"]
    int8 = report["speed"]["int8"]
    assert int8 and all(v["pays"] or v["why"] for v in int8.values())
    # The exported model gives the chosen candidate's predictions (its float model, exactly
    # when the final is float).
    chosen = next(c for c in report["candidates"] if c["final"])
    # The listing marks the file to deploy: the chosen quantizer's file, or the float export.
    files = {"int8_static": "model.int8.onnx", "int8_dynamic": "model.int8_dynamic.onnx"}
    files |= {"fp16": "model.fp16.onnx", None: "model.onnx"}
    marked = [name for name, a in listed.items() if a["final"]]
    assert marked == [files[chosen["axes"]["quantize.method"]]]
    if chosen["axes"]["quantize.method"] is None:
        x = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
        ours = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": x})[0]
        theirs = ort.InferenceSession(str(out / f"candidate-{final}.onnx")).run(None, {"input": x})[
            0
        ]
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_search_resumed_after_a_crash_skips_finished_candidates(tmp_path):
    spec = JobSpec.model_validate(
        {**SEARCH, "search": {**SEARCH["search"], "quantize.method": [None]}}
    )
    made: list[str] = []

    def on_event(e):
        if e["type"] == "candidate":
            made.append(e["candidate"]["key"])

    with pytest.raises(Cancelled):  # a crash after the first branch's first candidate
        run_pipeline(spec, tmp_path, on_event=on_event, should_cancel=lambda: len(made) >= 4)
    first = list(made)
    made.clear()
    events: list[dict] = []
    report = run_pipeline(spec, tmp_path, on_event=lambda e: (on_event(e), events.append(e)))
    assert set(first).isdisjoint(made) and sorted(first + made) == sorted(
        c["key"] for c in report["candidates"]
    )
    runs = {e["row"]["run"] for e in events if e["type"] == "history"}
    assert "teacher" not in runs  # the teacher came from its record


def test_impossible_gates_still_hand_over_the_closest_and_say_by_how_much(tmp_path):
    spec = JobSpec.model_validate(
        {
            **SEARCH,
            "search": {**SEARCH["search"], "prune.amount": [0, 0.3], "quantize.method": [None]},
            "gates": {"min_accuracy": 0.999, "min_size_ratio": 1000},
        }
    )
    report = run_pipeline(spec, tmp_path)
    assert report["gates_passed"] is False and "best effort" in report["metrics"]["final"]["reason"]
    assert (tmp_path / "model.onnx").exists()
    missed = {g["gate"]: g for g in report["gates"]}
    final = report["metrics"]["final"]
    assert missed["final.accuracy>=0.999"]["missed_by"] == pytest.approx(0.999 - final["accuracy"])
    assert missed["final.size_ratio>=1000"]["missed_by"] == pytest.approx(
        1000 - final["size_ratio"]
    )


@pytest.mark.parametrize(
    "search,field",
    [
        ({"student": [{"arch": "cnn_tiny"}, {"arch": "nope"}]}, "search.student[1].arch"),
        ({"distill.temperature": [4, 0]}, "search.distill.temperature[1]"),
        ({"distill.alpha": [0.5, 1.5]}, "search.distill.alpha[1]"),
        ({"prune.amount": [0, 1.0]}, "search.prune.amount[1]"),
        ({"prune.method": ["channel_l2", "random"]}, "search.prune.method[1]"),
        ({"quantize.method": [None, "int4"]}, "search.quantize.method[1]"),
        ({"quantize.calibration": ["minmax", "kl"]}, "search.quantize.calibration[1]"),
        ({"objective": "speed"}, "search.objective"),
        ({"student": []}, "search.student"),
        ({"depth": [1]}, "search.depth"),
    ],
)
def test_every_axis_is_validated_naming_the_value(search, field):
    with pytest.raises(Exception) as e:
        JobSpec.model_validate({"search": search})
    assert format_validation_error(e.value).startswith(f"{field}: ")


def test_the_number_of_candidates_is_capped(tmp_path):
    spec = JobSpec.model_validate(SEARCH)  # 12 candidates
    with pytest.raises(SpecError, match=r"search: 12 candidates .* at most 10 are allowed"):
        run_pipeline(spec, tmp_path, limits=SpecLimits(max_candidates=10))
    assert not (tmp_path / ".work" / "shared").exists()  # refused before any work


def test_calibration_is_an_axis_and_qat_a_quantizer_of_a_search(tmp_path):
    spec = {
        **LEARNING_SPEC,
        "prune": None,
        "distill": {**LEARNING_SPEC["distill"], "baseline": False},
        "quantize": {"method": "int8_static", "qat_epochs": 2},
        "search": {
            "quantize.method": [None, "int8_static", "qat"],
            "quantize.calibration": ["minmax", "entropy", "percentile"],
            "objective": "accuracy",
        },
    }
    report = run_pipeline(JobSpec.model_validate(spec), tmp_path)
    by_axes = {
        (c["axes"]["quantize.method"], c["axes"]["quantize.calibration"]): c
        for c in report["candidates"]
    }
    # int8_static once per calibration; the quantizers that do not calibrate once.
    assert set(by_axes) == {
        (None, None),
        ("int8_static", "minmax"),
        ("int8_static", "entropy"),
        ("int8_static", "percentile"),
        ("qat", None),
    }
    branch = tmp_path / ".work" / "branches" / "0"

    def digest(c):
        record = json.loads((branch / "candidates" / f"{c['key']}.json").read_text())
        return hashlib.sha256((branch / record["files"]["onnx"]).read_bytes()).hexdigest()

    # Each calibration gave its model its own activation ranges (the files differ).
    calibrated = [digest(by_axes[("int8_static", m)]) for m in ("minmax", "entropy", "percentile")]
    assert len(set(calibrated)) == 3
    # The qat candidate was fine-tuned against the teacher (its epochs in the history), runs in
    # ONNX Runtime, and learned something (chance is 0.1 on digits).
    qat = by_axes[("qat", None)]
    rows = [json.loads(line) for line in (branch / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["run"] == f"{qat['key']}:qat"] == [1, 2]
    assert qat["metrics"]["accuracy"] >= 0.6
    # The model card names how the chosen model was quantized.
    chosen = next(c for c in report["candidates"] if c["final"])
    card = json.loads((tmp_path / "model_card.json").read_text())["quantize"]
    assert card["method"] == (chosen["axes"]["quantize.method"] or "int8_static")
    if chosen["axes"]["quantize.method"] == "int8_static":
        assert card["calibration"] == chosen["axes"]["quantize.calibration"]
