"""Measure a model on the deployment runtime: ONNX Runtime on CPU.

Accuracy on the held-out split, file size, parameter count and median batch-1 latency, all
taken from the same .onnx file a user downloads, so teacher and final are measured alike.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from worker.pipeline.spec import EvaluateSpec


def _session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_params(path: Path) -> int:
    """Weights stored in the file (initializers), counting elements whatever their dtype."""
    model = onnx.load(str(path), load_external_data=False)
    return int(
        sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer if len(t.dims) > 0)
    )


def onnx_logits(path: Path, x: torch.Tensor, batch_size: int = 256, threads: int = 0) -> np.ndarray:
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    xs = x.numpy().astype(np.float32)
    return np.concatenate(
        [sess.run(None, {name: xs[i : i + batch_size]})[0] for i in range(0, len(xs), batch_size)]
    )


def latency_ms(
    path: Path, sample: np.ndarray, spec: EvaluateSpec, batch: int = 1
) -> dict[str, float]:
    sess = _session(path, spec.threads)
    name = sess.get_inputs()[0].name
    feed = {name: np.repeat(sample[:1], batch, axis=0).astype(np.float32)}
    for _ in range(spec.latency_warmup):
        sess.run(None, feed)
    times = []
    for _ in range(spec.latency_runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {
        "latency_ms": statistics.median(times),
        "latency_p90_ms": times[int(0.9 * (len(times) - 1))],
    }


def measured(
    path: Path,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    spec: EvaluateSpec,
    params: int | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics contract for one model (accuracy with its 95% Wilson interval, params,
    size_bytes, latency at batch 1 and 32), and which test samples it got right (for paired
    comparisons with the teacher)."""
    from worker.pipeline.stats import wilson

    logits = onnx_logits(path, x_test)
    correct = logits.argmax(1) == y_test.numpy()
    metrics: dict[str, Any] = {
        "accuracy": float(correct.mean()),
        "accuracy_ci": list(wilson(int(correct.sum()), len(correct))),
        "params": int(params if params is not None else onnx_params(path)),
        "size_bytes": path.stat().st_size,
        **latency_ms(path, x_test[:1].numpy(), spec),
    }
    if spec.latency_b32_runs > 0:
        b32 = spec.model_copy(update={"latency_runs": spec.latency_b32_runs})
        metrics["latency_b32_ms"] = latency_ms(path, x_test[:1].numpy(), b32, batch=32)[
            "latency_ms"
        ]
    return metrics, correct


def measure(
    path: Path,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    spec: EvaluateSpec,
    params: int | None = None,
) -> dict[str, Any]:
    """The metrics contract for one model: accuracy, params, size_bytes, latency_ms."""
    return measured(path, x_test, y_test, spec, params)[0]
