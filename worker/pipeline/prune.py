"""Prune stage: structured channel pruning that really removes channels (Torch-Pruning), or
global unstructured magnitude pruning; optional iterative steps, each followed by KD fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.utils.prune as tprune
import torch_pruning as tp
from torch import nn

from worker.pipeline.archs import count_params
from worker.pipeline.context import StageContext
from worker.pipeline.data import DataBundle
from worker.pipeline.distill import TeacherSignal, finetune
from worker.pipeline.registry import Registry
from worker.pipeline.spec import DistillSpec, PruneSpec
from worker.pipeline.train import accuracy

# A pruner takes (model, example input, amount, steps, num_classes) and returns a callable
# that performs one pruning step in place.
PRUNERS: Registry[Callable[..., Callable[[], None]]] = Registry("pruner")


def _classifier_layers(
    model: nn.Module, example: torch.Tensor, num_classes: int
) -> list[nn.Module]:
    """Layers whose outputs are the logits: pruning their outputs would drop classes."""
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)
    ]


def _channel_pruner(p: int) -> Callable[..., Callable[[], None]]:
    def make(model: nn.Module, example: torch.Tensor, amount: float, steps: int, num_classes: int):
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=p),
            pruning_ratio=amount,
            iterative_steps=steps,
            ignored_layers=_classifier_layers(model, example, num_classes),
        )
        return pruner.step

    return make


PRUNERS.add("channel_l2", _channel_pruner(2))
PRUNERS.add("channel_l1", _channel_pruner(1))


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


@PRUNERS.register("magnitude")
def _magnitude(
    model: nn.Module, example: torch.Tensor, amount: float, steps: int, num_classes: int
):
    """Global unstructured L1 pruning. Zeros weights but keeps dense tensors: the file and the
    dense latency do not shrink, only sparsity rises (the report shows both)."""
    done = [0]

    def step() -> None:
        done[0] += 1
        # The target sparsity after k of n steps is amount * k / n; torch applies each amount
        # to the still-unpruned weights, hence the conversion.
        target, before = amount * done[0] / steps, amount * (done[0] - 1) / steps
        tprune.global_unstructured(
            _prunable(model),
            pruning_method=tprune.L1Unstructured,
            amount=(target - before) / (1 - before),
        )

    return step


def _finalize(model: nn.Module) -> None:
    for m, name in _prunable(model):
        if tprune.is_pruned(m) and hasattr(m, f"{name}_mask"):
            tprune.remove(m, name)


def _nonzero(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def step_amount(method: str, done: float, target: float) -> float:
    """The amount to ask of `method` for a model already pruned by `done` to reach `target`
    overall: channel pruners take a share of the channels left; global magnitude pruning
    ranks every weight, the zeros first, so it takes the overall share."""
    if method == "magnitude":
        return target
    return 1.0 - (1.0 - target) / (1.0 - done)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    return _flops(model, example)


def _flops(model: nn.Module, example: torch.Tensor) -> int:
    macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def run(
    model: nn.Module,
    data: DataBundle,
    spec: PruneSpec,
    distill: DistillSpec,
    signal: TeacherSignal,
    ctx: StageContext,
    seed: int,
    tag: str = "finetune",
) -> tuple[nn.Module, dict[str, float]]:
    """Prune `model` in place by `spec` and fine-tune it against the teacher after each step
    (runs named `<tag>1`, `<tag>2`, …); returns it and the before/after numbers."""
    device = ctx.device
    model = model.to(device).eval()
    example = data.x_train[:1].to(device)
    before = {"params_before": count_params(model), "flops_before": _flops(model, example)}
    step = PRUNERS.get(spec.method)(model, example, spec.amount, spec.steps, data.num_classes)
    per_step = [spec.finetune_epochs // spec.steps] * spec.steps
    per_step[-1] += spec.finetune_epochs - sum(per_step)
    metrics: dict[str, float] = {}
    for k in range(spec.steps):
        ctx.check_cancel()
        step()
        ctx.progress(
            (k + 0.1) / spec.steps,
            f"pruned step {k + 1}/{spec.steps}: {count_params(model)} params",
        )
        if per_step[k] > 0:
            span = ((k + 0.1) / spec.steps, (k + 1) / spec.steps)
            # KD fine-tuning with the distillation's settings and the prune stage's rate.
            parts = finetune(
                model,
                data,
                distill,
                signal,
                ctx,
                lr=spec.lr,
                epochs=per_step[k],
                seed=seed + k,
                span=span,
                tag=f"{tag}{k + 1}",
            )
            metrics.update({f"finetune_{n}": v for n, v in parts.items()})
    _finalize(model)
    model.eval()
    metrics.update(before)
    metrics["params_after"] = count_params(model)
    metrics["flops_after"] = _flops(model, example)
    metrics["nonzero_params"] = _nonzero(model)
    metrics["sparsity"] = 1.0 - metrics["nonzero_params"] / max(metrics["params_after"], 1)
    metrics["params"] = metrics["params_after"]
    metrics["torch_accuracy"] = accuracy(model, data.x_test, data.y_test, device)
    return model, metrics
