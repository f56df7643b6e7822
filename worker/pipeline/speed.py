"""Speed proven, not assumed: two models' latencies compared by interleaved, repeated runs on
this host with a 95% interval on their ratio; the host's int8 capability from its CPU flags;
why an int8 model did not pay; and a per-operator profile of a model on ONNX Runtime.

Two medians measured minutes apart on a shared CPU differ by more than a small model's int8
gain, so a comparison runs both models in the same rounds (in a seeded random order each
round, so a drift in the machine's load falls on both alike), takes each round's median per
model, and puts a percentile-bootstrap interval on the mean log-ratio over the rounds.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from worker.pipeline.spec import EvaluateSpec
from worker.pipeline.stats import ratio_interval, verdict

# The flags that decide how ONNX Runtime multiplies u8 x s8 on x86 (its MLAS kernels).
INT8_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Below this float latency at batch 1 a model is too little work for int8 kernels to beat the
# cost of quantizing their inputs. Measured (docs/BENCHMARKS.md): cnn_tiny at 8 px, 0.01 ms,
# int8 at 0.7x; resnet18 at 96 px, 27 ms, int8 at 3.6-4.9x. The threshold is a cautious pick
# between the two, not a measured crossover.
SMALL_MODEL_MS = 0.2
# Each model runs at least this long per round (up to MAX_RUNS runs), so that a round's median
# of a tiny model is not timer noise.
ROUND_MS = 5.0
MAX_RUNS = 500
# A comparison may stop before its last round when the rounds so far already say "faster" or
# "slower" on a 99.5% interval (a stricter level at these two early looks keeps the chance of
# stopping on a wrong verdict near the final 95% interval's). Plainly different models (int8
# of a big net, or of a tiny one) stop after 8 rounds; close ones run every round.
EARLY_LOOKS = (8, 14)
EARLY_LEVEL = 99.5


# -- the host ------------------------------------------------------------------------------------


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The `flags` of /proc/cpuinfo (or of the text given); empty where there is none (not
    Linux, not x86): then nothing is claimed about the host."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def int8_capability(flags: Iterable[str]) -> dict[str, Any]:
    """Which int8 instructions the CPU has, and the weight width that follows: 8-bit weights
    with VNNI (int32 sums, no saturation), 7-bit without (VPMADDUBSW sums pairs into int16,
    which 8-bit weights can saturate; ONNX Runtime's quantization docs)."""
    have = set(flags)
    found = {f: f in have for f in INT8_FLAGS}
    vnni = any(found[f] for f in VNNI_FLAGS)
    return {"flags": found, "vnni": vnni, "weight_bits": 8 if vnni else 7}


# -- interleaved comparison --------------------------------------------------------------------


def session(path: Path, threads: int, profile_prefix: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed(sess: ort.InferenceSession, sample: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    return {sess.get_inputs()[0].name: np.repeat(sample[:1], batch, axis=0).astype(np.float32)}


def _round_ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0


def compare(
    a: Path,
    b: Path,
    sample: np.ndarray,
    *,
    batch: int = 1,
    rounds: int = 20,
    runs: int = 10,
    warmup: int = 5,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """How many times faster `b` runs than `a` (latency of a / latency of b), from `rounds`
    interleaved rounds of `runs` timed runs each, with its 95% interval."""
    sessions = [session(a, threads), session(b, threads)]
    feeds = [_feed(s, sample, batch) for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(warmup):
            s.run(None, f)
    # A round of a 10 us model is mostly timer noise: each round runs at least ROUND_MS.
    pilot = max(_round_ms(s, f, 3) for s, f in zip(sessions, feeds, strict=True))
    runs = max(runs, min(MAX_RUNS, math.ceil(ROUND_MS / max(pilot, 1e-6))))
    rng = np.random.default_rng(seed)
    ms = np.empty((rounds, 2))
    done = rounds
    for r in range(rounds):
        for i in rng.permutation(2):
            ms[r, i] = _round_ms(sessions[i], feeds[i], runs)
        if r + 1 in EARLY_LOOKS and r + 1 < rounds:
            early = ratio_interval(
                np.log(ms[: r + 1, 0] / ms[: r + 1, 1]), seed=seed, level=EARLY_LEVEL
            )
            if verdict(*early[1:]) != "not different":
                done = r + 1
                break
    ms = ms[:done]
    ratio, lo, hi = ratio_interval(np.log(ms[:, 0] / ms[:, 1]), seed=seed)
    return {
        "speedup": ratio,
        "ci": [lo, hi],
        "verdict": verdict(lo, hi),
        "batch": batch,
        "rounds": done,
        "runs_per_round": runs,
        "a_ms": float(np.median(ms[:, 0])),
        "b_ms": float(np.median(ms[:, 1])),
    }


def compare_spec(
    a: Path, b: Path, sample: np.ndarray, spec: EvaluateSpec, *, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Batch 1, and batch 32 when the job measures it, with the spec's rounds."""
    rounds = spec.compare_rounds
    per = max(3, spec.latency_runs // rounds)
    out = {"b1": compare(a, b, sample, rounds=rounds, runs=per, threads=spec.threads, seed=seed)}
    if spec.latency_b32_runs > 0:
        per32 = max(2, spec.latency_b32_runs // rounds)
        out["b32"] = compare(
            a, b, sample, batch=32, rounds=rounds, runs=per32, threads=spec.threads, seed=seed
        )
    return out


# -- why int8 did not pay ----------------------------------------------------------------------


def qdq_nodes(path: Path, threads: int = 1) -> dict[str, int]:
    """QuantizeLinear/DequantizeLinear nodes in the file, and those left once ONNX Runtime has
    fused what it can into int8 kernels: each one left is a conversion between float ops."""
    in_file = sum(n.op_type in QDQ_OPS for n in onnx.load(str(path)).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    g = optimized.graph
    ends = {i.name for i in g.input} | {o.name for o in g.output}
    qdq = [n for n in g.node if n.op_type in QDQ_OPS]
    # The input's quantize and the output's dequantize are needed by any int8 model.
    boundary = sum(bool(ends & {*n.input, *n.output}) for n in qdq)
    return {
        "in_file": int(in_file),
        "after_fusion": len(qdq),
        "between_float_ops": len(qdq) - boundary,
        "int8_ops": sum(n.op_type.startswith(("QLinear", "QGemm")) for n in g.node),
        "nodes_after_fusion": len(g.node),
    }


def why_not_faster(
    capability: dict[str, Any], float_ms: float, qdq: dict[str, int] | None
) -> list[str]:
    """The reasons, in words, an int8 model was not faster than its float parent."""
    why = []
    if not capability["vnni"]:
        why.append(
            "this CPU has no VNNI (avx512_vnni, avx_vnni or amx_int8): int8 products go through "
            "AVX2's VPMADDUBSW, which gains little over float"
        )
    if float_ms < SMALL_MODEL_MS:
        why.append(
            f"the model is too small: the float model runs in {float_ms:.3f} ms at batch 1, too "
            "little work for int8 kernels to beat the cost of quantizing their inputs"
        )
    if qdq and qdq["between_float_ops"] > 0:
        why.append(
            f"{qdq['between_float_ops']} QuantizeLinear/DequantizeLinear nodes are left between float "
            "ops after ONNX Runtime's fusion: each converts a tensor and back"
        )
    if not why:
        why.append("no known cause: the int8 kernels were simply not faster for this model here")
    return why


# -- where the time goes -----------------------------------------------------------------------


def op_profile(
    path: Path,
    sample: np.ndarray,
    *,
    batch: int = 1,
    runs: int = 20,
    warmup: int = 5,
    threads: int = 1,
) -> dict[str, Any]:
    """ONNX Runtime's own profiler over `runs` runs after `warmup` untimed ones (the first
    runs allocate), aggregated per operator type: microseconds per run, node count, and share
    of the time spent in operators."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(path, threads, profile_prefix=str(Path(tmp) / "ort"))
        feed = _feed(sess, sample, batch)
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    start = model_runs[warmup - 1] if warmup > 0 and len(model_runs) >= warmup else 0
    total: Counter[str] = Counter()
    nodes: dict[str, set[str]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if e.get("ts", 0) < start:
            continue
        op = e.get("args", {}).get("op_name", "?")
        total[op] += int(e.get("dur", 0))
        nodes.setdefault(op, set()).add(e["name"])
    spent = sum(total.values()) or 1
    ops = [
        {"op_type": op, "nodes": len(nodes[op]), "us_per_run": us / runs, "share": us / spent}
        for op, us in total.most_common()
    ]
    return {"model": path.name, "batch": batch, "runs": runs, "threads": threads, "ops": ops}


def evidence(
    paths: dict[str, Path],
    parents: dict[str, str | None],
    teacher: Path | None,
    sample: np.ndarray,
    spec: EvaluateSpec,
    *,
    vs_teacher: Iterable[str] = (),
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Interleaved comparisons for the choice: each model against the one it was made from
    (`parent`), and those in `vs_teacher` against the teacher (`teacher`); each at batch 1
    (`b1`) and 32 (`b32`, when measured). Models without a file are left out."""
    if spec.compare_rounds == 0:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, path in paths.items():
        parent = parents.get(key)
        if parent is not None and parent in paths:
            out.setdefault(key, {})["parent"] = compare_spec(
                paths[parent], path, sample, spec, seed=seed
            )
    for key in vs_teacher:
        if teacher is not None and key in paths and paths[key] != teacher:
            out.setdefault(key, {})["teacher"] = compare_spec(
                teacher, paths[key], sample, spec, seed=seed
            )
    return out


def int8_verdict(
    key: str, parent_ms: float, quantized: Path, comparison: dict[str, Any] | None
) -> dict[str, Any]:
    """Whether the int8 model `key` paid against its float parent at batch 1, and if not, why
    (in words), with the host's int8 capability and the Q/DQ nodes ONNX Runtime left."""
    capability = int8_capability(cpu_flags())
    qdq = qdq_nodes(quantized)
    out: dict[str, Any] = {"model": key, "qdq_nodes": qdq}
    if comparison is None:
        out.update(pays=None, why=["not compared with its float parent (compare_rounds: 0)"])
        return out
    out.update(
        speedup=comparison["speedup"],
        speedup_ci=comparison["ci"],
        verdict=comparison["verdict"],
        pays=comparison["verdict"] == "faster",
    )
    if not out["pays"]:
        out["why"] = why_not_faster(capability, parent_ms, qdq)
    return out


def host() -> dict[str, Any]:
    """What the report says about the CPU the comparisons ran on."""
    return int8_capability(cpu_flags())
