"""Sensitivity and accuracy control on a model int8 breaks in one known node
(tests/factories.py): the ranking finds it, the bounds hold and say what they left out, and a
budget nothing meets keeps the variant that lost least."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import factories
from worker.pipeline import sensitivity as sens
from worker.pipeline.errors import SpecError
from worker.pipeline.spec import QuantizeSpec, SensitivitySpec

SPEC = QuantizeSpec(per_channel=False, calibration_samples=64)


@pytest.fixture
def trials(tmp_path) -> sens.Trials:
    with np.load(factories.outlier_npz(tmp_path / "rows.npz")) as npz:
        x, y = torch.from_numpy(npz["x"]), npz["y"]
    model = factories.outlier_teacher(tmp_path / "t.onnx")
    return sens.Trials(model, x[:64], SPEC, x[64:], y[64:], tmp_path / "work")


def test_the_node_int8_breaks_ranks_first_and_alone_recovers_the_model(trials):
    whole = trials.score([])
    assert trials.float_accuracy > 0.95 and whole.accuracy < 0.5  # int8 breaks it
    ranked = sens.measure(trials, SensitivitySpec(), [], whole)
    assert ranked.ranking[0] == "hidden1"
    assert ranked.rows[0]["recovered"] == trials.float_accuracy - whole.accuracy
    assert all(r["recovered"] == 0.0 for r in ranked.rows[1:])
    assert ranked.rows[0]["snr_db"] > ranked.rows[1]["snr_db"] + 20
    assert ranked.samples == len(trials.y) and ranked.skipped == ranked.not_reached == []


def test_the_caps_say_what_they_left_out(trials):
    whole = trials.score([])
    capped = sens.measure(trials, SensitivitySpec(max_nodes=2), [], whole)
    assert capped.ranking == ["hidden1", "hidden2"] and capped.skipped == ["logits"]
    timed = sens.measure(trials, SensitivitySpec(max_seconds=1e-9), [], whole)
    assert timed.rows == [] and timed.not_reached == ["hidden1", "hidden2", "logits"]


def test_control_stops_at_the_budget_and_keeps_the_least_loss_when_none_meets_it(trials):
    whole = trials.score([])
    ctrl = sens.control(trials, ["hidden1", "hidden2", "logits"], [], whole, budget=0.0)
    assert ctrl.met and ctrl.keep_float == ["hidden1"] and len(ctrl.steps) == 2
    # a ranking that never names the broken node: nothing meets the budget
    ctrl = sens.control(trials, ["hidden2", "logits"], [], whole, budget=0.0)
    assert not ctrl.met and ctrl.keep_float == [] and len(ctrl.steps) == 3


def test_the_share_in_float_counts_weights_and_nodes(trials):
    share = sens.float_share(trials.nodes, ["hidden1"])
    assert share == {"float_share": 42 / 105, "float_node_share": 1 / 3}


def test_an_unknown_node_is_refused_naming_the_known_ones(trials):
    with pytest.raises(SpecError) as e:
        sens.check_keep_float(["hidden1", "conv9"], trials.nodes)
    assert e.value.code == "invalid_spec"
    assert e.value.message == (
        "quantize.keep_float: unknown node 'conv9'; the model's quantizable nodes are: "
        "hidden1, hidden2, logits"
    )
