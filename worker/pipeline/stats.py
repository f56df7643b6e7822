"""Confidence intervals for what a test split measures (a model's accuracy, and the accuracy
it lost against the teacher on the same samples) and for a speedup measured in interleaved
rounds (worker/pipeline/speed.py), with what such an interval says."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
# Two sessions of one and the same file differ by up to ~1 % here, steadily enough for an
# interval to exclude 1; a difference within this share counts as none.
SAME = 0.05


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: unlike the normal approximation it stays
    inside [0, 1] and is honest at 100% accuracy on a small test split."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    den = 1 + z * z / n
    return max(0.0, (centre - half) / den), min(1.0, (centre + half) / den)


def paired_drop_ci(
    teacher_correct: np.ndarray,
    model_correct: np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of teacher accuracy minus model accuracy, resampling
    the test samples in pairs: both models are judged on the same draw, so the samples both get
    right (or wrong) cancel, and the interval is far tighter than two independent ones."""
    t = np.asarray(teacher_correct, dtype=np.int8)
    m = np.asarray(model_correct, dtype=np.int8)
    if t.shape != m.shape or t.ndim != 1:
        raise ValueError("the two correctness vectors must be one entry per test sample")
    diff = (t - m).astype(np.float64)
    n = len(diff)
    if n == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory on large test splits
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def ratio_interval(
    log_ratios: np.ndarray, *, resamples: int = 2000, seed: int = 0, level: float = 95.0
) -> tuple[float, float, float]:
    """The ratio (geometric mean over rounds) and its `level`% percentile-bootstrap interval."""
    lr = np.asarray(log_ratios, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = lr[rng.integers(0, len(lr), size=(resamples, len(lr)))].mean(axis=1)
    tail = (100.0 - level) / 2
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return math.exp(lr.mean()), math.exp(lo), math.exp(hi)


def verdict(lo: float, hi: float, allowed_slowdown: float = 1.0) -> str:
    """What an interval on a speedup says: `faster` only when it lies above 1 + SAME,
    `slower` when it lies below 1 / (allowed_slowdown * (1 + SAME)), else `not different`."""
    if lo > 1.0 + SAME:
        return "faster"
    return "slower" if hi < 1.0 / (allowed_slowdown * (1.0 + SAME)) else "not different"
