import copy

import pytest
import torch

from worker.pipeline import distill, prune
from worker.pipeline.archs import build_model, count_params
from worker.pipeline.context import StageContext
from worker.pipeline.evaluate import measure
from worker.pipeline.export import export_onnx
from worker.pipeline.spec import DistillSpec, PruneSpec, StudentSpec


@pytest.fixture(scope="module")
def student_and_signal(digits, trained_teacher):
    spec = DistillSpec(epochs=6)
    student, _, signal = distill.run(
        trained_teacher, digits, spec, StudentSpec(arch="cnn_small"), StageContext(), seed=0
    )
    return student, signal


@pytest.mark.parametrize("method,steps", [("channel_l2", 1), ("channel_l1", 2)])
def test_channel_pruning_really_shrinks_the_model(
    digits, student_and_signal, method, steps, tmp_path, fast_eval
):
    student, signal = student_and_signal
    original = copy.deepcopy(student)
    pruned, metrics = prune.run(
        copy.deepcopy(student),
        digits,
        PruneSpec(method=method, amount=0.5, steps=steps, finetune_epochs=6, lr=3e-3),
        DistillSpec(),
        signal,
        StageContext(),
        seed=0,
    )
    assert metrics["params_after"] < 0.5 * metrics["params_before"]
    assert metrics["flops_after"] < metrics["flops_before"]
    assert count_params(pruned) == metrics["params_after"] < count_params(original)
    # Channels are gone, not zeroed: conv widths shrank.
    assert pruned.features[1][0].out_channels < original.features[1][0].out_channels
    # It still runs and still classifies every class.
    assert pruned(digits.x_test[:4]).shape == (4, digits.num_classes)
    small = measure(
        export_onnx(pruned, digits.x_test, tmp_path / "p.onnx"),
        digits.x_test,
        digits.y_test,
        fast_eval,
    )
    big = measure(
        export_onnx(original, digits.x_test, tmp_path / "s.onnx"),
        digits.x_test,
        digits.y_test,
        fast_eval,
    )
    assert small["size_bytes"] < 0.6 * big["size_bytes"]
    assert small["accuracy"] > 0.5


def _conv_work(path) -> int:
    """Multiply-adds per output pixel of every Conv in an ONNX file, read from its weights:
    out x in x kh x kw, summed (the maps keep their sizes when channels go)."""
    import math

    import onnx

    graph = onnx.load(str(path)).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    return sum(math.prod(weights[n.input[1]]) for n in graph.node if n.op_type == "Conv")


def test_channel_pruning_removes_the_work_from_the_exported_graph(digits, tmp_path):
    """Structured pruning must shrink what the runtime computes, not just zero weights: the
    exported ONNX convolutions really have fewer channels. (That this is also faster on the
    runtime is measured in bench/, not timed here.)"""
    model = build_model("cnn_large", digits.input_shape, digits.num_classes).eval()
    before = export_onnx(model, digits.x_test, tmp_path / "before.onnx")
    fake_signal = distill.TeacherSignal(
        logits=torch.zeros(len(digits.x_train), digits.num_classes), online=None
    )
    pruned, metrics = prune.run(
        model,
        digits,
        PruneSpec(amount=0.75, finetune_epochs=0),
        DistillSpec(),
        fake_signal,
        StageContext(),
        seed=0,
    )
    after = export_onnx(pruned, digits.x_test, tmp_path / "after.onnx")
    # A quarter of the channels on both sides of inner convolutions: ~1/16 of their work.
    assert _conv_work(after) < 0.15 * _conv_work(before)
    assert metrics["flops_after"] < 0.15 * metrics["flops_before"]


def test_magnitude_pruning_reaches_the_asked_sparsity(digits, student_and_signal):
    student, signal = student_and_signal
    pruned, metrics = prune.run(
        copy.deepcopy(student),
        digits,
        PruneSpec(method="magnitude", amount=0.6, steps=2, finetune_epochs=2),
        DistillSpec(),
        signal,
        StageContext(),
        seed=0,
    )
    weights = torch.cat(
        [
            m.weight.flatten()
            for m in pruned.modules()
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
        ]
    )
    assert float((weights == 0).float().mean()) == pytest.approx(0.6, abs=0.01)
    # Masks were folded in: plain parameters, nothing left for torch.nn.utils.prune to hold.
    assert not any(n.endswith("_orig") for n, _ in pruned.named_parameters())
    assert metrics["params_after"] == metrics["params_before"] and metrics["sparsity"] > 0.5
    assert metrics["torch_accuracy"] > 0.5
