"""Quantization-aware distillation's pieces: the weight width the spec asks for is the one in
the exported file, per channel or per tensor, and ONNX Runtime's int8 model predicts what the
fake-quantized torch model it came from predicts."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.ao.quantization import disable_observer

from worker.pipeline import qat
from worker.pipeline.distill import TeacherSignal, finetune
from worker.pipeline.evaluate import onnx_logits
from worker.pipeline.spec import DistillSpec, QuantizeSpec
from worker.pipeline.train import predict_logits


def _weights(path) -> list[np.ndarray]:
    """The int8 weight tensors of conv and linear layers (biases are int32)."""
    model = onnx.load(str(path))
    return [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1
    ]


@pytest.mark.parametrize("bits,per_channel", [(7, True), (8, False)])
def test_the_file_holds_the_width_asked_for_and_predicts_as_training_saw(
    digits, trained_teacher, ctx, tmp_path, bits, per_channel
):
    teacher = trained_teacher.module
    before = copy.deepcopy(teacher.state_dict())
    spec = QuantizeSpec(method="qat", weight_bits=bits, per_channel=per_channel)
    signal = TeacherSignal(predict_logits(teacher, digits.x_train, ctx.device), None)
    example = digits.x_train[:1]
    prepared = qat.prepare(teacher, example, spec)
    parts = finetune(
        prepared, digits, DistillSpec(), signal, ctx, lr=3e-3, epochs=1, seed=0, tag="q"
    )
    assert parts["kd_loss"] > 0  # trained against the teacher
    qat.export(prepared, example, tmp_path / "q.onnx")
    # The model it was made from is not changed (the job reports it as it was).
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    weights = _weights(tmp_path / "q.onnx")
    assert len(weights) >= 2  # every conv and the classifier
    limit = 2 ** (bits - 1) - 1
    assert max(int(np.abs(w).max()) for w in weights) <= limit
    # The width is used: in each layer the widest channel (or the tensor) is within a few steps
    # of the limit, and per channel the median channel uses at least half of it. Not every
    # channel: the observers' ranges are moving averages over the fine-tune, so a channel whose
    # weights shrank late sits lower (how many depends on the run; seen in the full suite).
    # That the ONNX model computes what training did is the exact check, below.
    widest = [np.abs(w).reshape(len(w), -1).max(1) for w in weights]
    assert all(m.max() >= limit - 3 for m in widest)
    if per_channel:
        assert all(np.median(m) >= limit // 2 for m in widest)
    # ONNX Runtime's int8 model predicts what the fake-quantized model predicted in training.
    prepared.apply(disable_observer)
    seen = predict_logits(prepared, digits.x_test, ctx.device).argmax(1).numpy()
    ours = onnx_logits(tmp_path / "q.onnx", digits.x_test).argmax(1)
    assert (ours == seen).mean() >= 0.97
