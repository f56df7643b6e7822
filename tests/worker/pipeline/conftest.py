"""Tiny data and models so each stage runs in about a second on a CPU."""

from __future__ import annotations

import pytest
import torch

from worker.pipeline.archs import build_model
from worker.pipeline.context import StageContext
from worker.pipeline.data import DataBundle, load_dataset
from worker.pipeline.losses import CrossEntropyOnly
from worker.pipeline.spec import BuiltinDataset, EvaluateSpec
from worker.pipeline.teacher import TeacherResult
from worker.pipeline.train import TrainConfig, fit


@pytest.fixture(scope="session")
def digits() -> DataBundle:
    return load_dataset(BuiltinDataset(max_samples=600), seed=0)


@pytest.fixture
def ctx(tmp_path) -> StageContext:
    return StageContext(device=torch.device("cpu"), checkpoint_dir=tmp_path / "ckpt")


@pytest.fixture(scope="session")
def fast_eval() -> EvaluateSpec:
    return EvaluateSpec(latency_runs=10, latency_warmup=2)


@pytest.fixture(scope="session")
def trained_teacher(digits) -> TeacherResult:
    """A small CNN trained for a few epochs: good enough to be a teacher on 600 digits."""
    torch.manual_seed(0)
    model = build_model("cnn_small", digits.input_shape, digits.num_classes)
    fit(
        model,
        digits.x_train,
        digits.y_train,
        cfg=TrainConfig(epochs=6, lr=3e-3, weight_decay=0.0, batch_size=64),
        loss_fn=CrossEntropyOnly(),
        ctx=StageContext(),
    )
    return TeacherResult(model.eval(), model, None, {}, "cnn_small", {})
