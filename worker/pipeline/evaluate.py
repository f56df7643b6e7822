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

from worker.pipeline.samples import DataSettings, Samples, Split, batch_size_for, batches
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


def onnx_activation_bytes(path: Path) -> int:
    """Bytes per sample of every tensor the graph computes, from ONNX shape inference with the
    batch axis at 1: the meta trace that sizes evaluation batches (an upper bound, as ONNX
    Runtime reuses buffers)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    total = 0
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        total += int(np.prod(dims, dtype=np.int64)) * itemsize
    return max(total, 1)


def onnx_logits(
    path: Path,
    x: Samples,
    batch_size: int | None = None,
    threads: int = 0,
    settings: DataSettings | None = None,
) -> np.ndarray:
    """Logits of the model at `path` for `x`, read and run a batch at a time; the batch size,
    unless given, from the memory budget and the graph's activation bytes per sample."""
    sess = _session(path, threads)
    name = sess.get_inputs()[0].name
    if batch_size is None:
        settings = settings or (x.settings if isinstance(x, Split) else DataSettings())
        per_sample = onnx_activation_bytes(path)
        batch_size = batch_size_for(per_sample, settings.budget(torch.device("cpu")), len(x))
    return np.concatenate(
        [sess.run(None, {name: xb.numpy().astype(np.float32)})[0] for xb in batches(x, batch_size)]
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
    x_test: Samples,
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
    x_test: Samples,
    y_test: torch.Tensor,
    spec: EvaluateSpec,
    params: int | None = None,
) -> dict[str, Any]:
    """The metrics contract for one model: accuracy, params, size_bytes, latency_ms."""
    return measured(path, x_test, y_test, spec, params)[0]
