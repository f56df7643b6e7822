import copy

import pytest
import torch

from worker.pipeline import distill
from worker.pipeline.context import StageContext
from worker.pipeline.errors import Cancelled, NanLoss, SpecError
from worker.pipeline.losses import HintonKD
from worker.pipeline.spec import DistillSpec, FeatureLossSpec, StudentSpec
from worker.pipeline.teacher import TeacherResult
from worker.pipeline.train import TrainConfig, fit

STUDENT = StudentSpec(arch="cnn_tiny")


class CountingTeacher(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.samples = inner, 0, 0

    def forward(self, x):
        self.calls += 1
        self.samples += len(x)
        return self.inner(x)


def test_cached_logits_give_the_same_training_as_online_kd(digits, trained_teacher):
    """Caching must be an optimisation only: same losses, same weights as the online loop."""
    teacher = trained_teacher.module.eval()
    cfg = TrainConfig(epochs=2, lr=3e-3, weight_decay=0.0, batch_size=64)
    torch.manual_seed(1)
    from worker.pipeline.archs import build_model

    base = build_model("cnn_tiny", digits.input_shape, digits.num_classes)
    online, cached = copy.deepcopy(base), copy.deepcopy(base)
    counting = CountingTeacher(teacher)
    p_online = fit(
        online,
        digits.x_train,
        digits.y_train,
        cfg=cfg,
        loss_fn=HintonKD(),
        ctx=StageContext(),
        teacher=counting,
    )
    with torch.no_grad():
        logits = teacher(digits.x_train)
    p_cached = fit(
        cached,
        digits.x_train,
        digits.y_train,
        cfg=cfg,
        loss_fn=HintonKD(),
        ctx=StageContext(),
        teacher_logits=logits,
    )
    assert p_online["loss"] == pytest.approx(p_cached["loss"], rel=1e-4)
    assert p_online["kd_loss"] == pytest.approx(p_cached["kd_loss"], rel=1e-4)
    for a, b in zip(online.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)
    # Online KD ran the teacher on every sample of every epoch.
    assert counting.samples >= 2 * (len(digits.x_train) - 1)


def test_distill_stage_caches_teacher_once_and_learns(digits, trained_teacher, ctx):
    counting = CountingTeacher(trained_teacher.module)
    teacher = TeacherResult(counting, counting, None, {})
    spec = DistillSpec(epochs=8, lr=5e-3)
    student, metrics, signal = distill.run(teacher, digits, spec, STUDENT, ctx, seed=0)
    assert signal.logits is not None and metrics["teacher_logits_cached"] == 1.0
    assert counting.samples == len(digits.x_train)  # one pass, not one per epoch
    assert metrics["torch_accuracy"] > 0.8
    with torch.no_grad():  # measured here, not with the accuracy() the stage itself used
        hits = (student.eval()(digits.x_test).argmax(1) == digits.y_test).float().mean()
    assert metrics["torch_accuracy"] == pytest.approx(hits.item())


def test_augmentation_forces_online_teacher(digits, trained_teacher, ctx):
    counting = CountingTeacher(trained_teacher.module)
    teacher = TeacherResult(counting, counting, None, {})
    spec = DistillSpec(epochs=2, augment=True)
    _, metrics, signal = distill.run(teacher, digits, spec, STUDENT, ctx, seed=0)
    assert signal.logits is None and metrics["teacher_logits_cached"] == 0.0
    assert counting.samples >= 2 * (len(digits.x_train) - 1)


@pytest.mark.parametrize(
    "loss,s_layer,t_layer,weight",
    [("hint", "features.1", "features.2", 1.0), ("at", "features.0", "features.1", 10.0)],
)
def test_feature_losses_pull_student_layers_toward_the_teacher(
    digits, trained_teacher, loss, s_layer, t_layer, weight
):
    per_epoch = []

    def on_progress(stage, fraction, message):
        if "feature_loss=" in message:
            per_epoch.append(float(message.split("feature_loss=")[1].split()[0]))

    ctx = StageContext(on_progress=on_progress)
    spec = DistillSpec(
        epochs=5,
        feature=FeatureLossSpec(
            loss=loss, student_layer=s_layer, teacher_layer=t_layer, weight=weight
        ),
    )
    _, metrics, signal = distill.run(trained_teacher, digits, spec, STUDENT, ctx, seed=0)
    assert signal.logits is None  # feature losses need the teacher's inner layers online
    assert len(per_epoch) == 5 and per_epoch[-1] < 0.8 * per_epoch[0]
    assert metrics["torch_accuracy"] > 0.3  # still learning the task (chance is 0.1)


def test_unknown_feature_layer_names_the_known_layers(digits, trained_teacher, ctx):
    spec = DistillSpec(
        epochs=1, feature=FeatureLossSpec(student_layer="nope", teacher_layer="features.1")
    )
    with pytest.raises(SpecError, match=r"student_layer: no layer 'nope'; layers: features"):
        distill.run(trained_teacher, digits, spec, STUDENT, ctx, seed=0)


def test_nan_loss_fails_with_nan_loss(digits, ctx):
    def nan_teacher(x):
        return torch.full((len(x), 10), float("nan"))

    teacher = TeacherResult(nan_teacher, None, None, {})
    with pytest.raises(NanLoss, match="loss became nan"):
        distill.run(
            teacher, digits, DistillSpec(epochs=1, cache_teacher_logits=False), STUDENT, ctx, seed=0
        )


def test_cancel_stops_at_a_batch_boundary(digits, trained_teacher, tmp_path):
    seen = []

    def should_cancel():
        seen.append(1)
        return len(seen) > 3

    ctx = StageContext(should_cancel=should_cancel)
    with pytest.raises(Cancelled):
        distill.run(trained_teacher, digits, DistillSpec(epochs=50), STUDENT, ctx, seed=0)
    assert len(seen) == 4  # stopped on the 4th batch, not at the end of 50 epochs


def test_baseline_trains_without_teacher(digits, ctx):
    model, metrics = distill.train_student(
        STUDENT, DistillSpec(epochs=3), digits, ctx, 0, signal=None, tag="baseline"
    )
    assert "train_kd_loss" not in metrics and metrics["torch_accuracy"] > 0.3


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_epoch_checkpoint_resumes_to_the_same_result(digits, trained_teacher, tmp_path, augment):
    """A stage killed mid-way resumes from its last epoch and ends where an unbroken run ends
    (augmented: the resumed epochs draw the same shifts and flips as the unbroken run's)."""
    spec = DistillSpec(epochs=4, augment=augment)
    ref, _, _ = distill.run(
        trained_teacher, digits, spec, STUDENT, StageContext(checkpoint_dir=tmp_path / "a"), seed=0
    )

    calls = []
    batches_per_epoch = -(-len(digits.x_train) // spec.batch_size)

    def cancel_in_epoch_3():
        calls.append(1)
        return len(calls) > 2 * batches_per_epoch + 1

    ckpt = tmp_path / "b"
    with pytest.raises(Cancelled):
        distill.run(
            trained_teacher,
            digits,
            spec,
            STUDENT,
            StageContext(checkpoint_dir=ckpt, should_cancel=cancel_in_epoch_3),
            seed=0,
        )
    assert (ckpt / "distill.pt").exists()
    resumed, _, _ = distill.run(
        trained_teacher, digits, spec, STUDENT, StageContext(checkpoint_dir=ckpt), seed=0
    )
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
