"""The stages a spec runs. Its own light module: the API stores each job's planned stages at
POST, and importing the runner for it (ONNX Runtime, Torch-Pruning) cost the API's first
POST 2 s and 117 MB."""

from __future__ import annotations

from worker.pipeline.spec import JobSpec, TrainedTeacher


def stage_plan(spec: JobSpec) -> list[tuple[str, float]]:
    """The stages this spec runs, each with a rough cost weight (in epochs) for progress."""
    teacher_w = float(spec.teacher.epochs) if isinstance(spec.teacher, TrainedTeacher) else 1.0
    plan = [("teacher", max(teacher_w, 1.0))]
    if spec.distill.baseline:
        plan.append(("baseline", max(spec.distill.epochs, 1)))
    plan.append(("distill", max(spec.distill.epochs, 1)))
    if spec.prune is not None:
        plan.append(("prune", spec.prune.finetune_epochs + 1.0))
    if spec.quantize is not None:
        plan.append(("quantize", 2.0))
    plan.append(("export", 1.0))
    return plan
