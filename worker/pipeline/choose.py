"""Which model a job hands over: the Pareto front of what it measured, and the final choice.

The final model is the best by the job's objective (`size`, `latency`, `latency_b32`,
`accuracy`) among the candidates that pass every gate. A "compression" that is not smaller
(objective size) or not faster (objective latency) than a model it was derived from is never
chosen: an int8 file bigger than its float parent is not a result. Nor, whatever the objective,
is one proven slower than the model it came from (`gates.max_slowdown` allows some). "Faster"
and "slower" rest on the 95% interval of the speedup from interleaved runs of the two models
(worker/pipeline/speed.py); where no such comparison was made, speed excludes nothing but the
latency objectives' point comparison. When no candidate passes,
the job still hands over its best effort: the candidate that fails the fewest gates, then
misses them by the least (each miss relative to its limit), then the best by the objective;
each gate says by how much it was missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distillery.gates import Gate, check
from worker.pipeline.stats import paired_drop_ci, verdict

# The metric each objective minimises (accuracy: maximised), and the one breaking ties.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "size": ("size_bytes", "accuracy"),
    "latency": ("latency_ms", "accuracy"),
    "latency_b32": ("latency_b32_ms", "accuracy"),
    "accuracy": ("accuracy", "size_bytes"),
}
WORDS = {
    "size": "smallest",
    "latency": "fastest at batch 1",
    "latency_b32": "fastest at batch 32",
    "accuracy": "most accurate",
}


@dataclass
class Choice:
    final: str  # the chosen candidate's key
    gates_passed: bool
    reason: str
    front: list[str]
    gates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> results
    excluded: list[str] = field(default_factory=list)  # compressions no better than a parent


def _score(objective: str, m: dict[str, Any]) -> tuple[float, float]:
    """Lower is better."""
    first, tie = OBJECTIVES[objective]
    sign = -1.0 if first == "accuracy" else 1.0
    return sign * float(m[first]), (-1.0 if tie == "accuracy" else 1.0) * float(m[tie])


def pareto_front(candidates: dict[str, dict[str, Any]], latency: str = "latency_ms") -> list[str]:
    """Keys of the candidates no other candidate beats on accuracy, size and latency at once
    (at least as good on all three, better on one)."""

    def dominates(a: dict, b: dict) -> bool:
        ge = a["accuracy"] >= b["accuracy"]
        le = a["size_bytes"] <= b["size_bytes"] and a[latency] <= b[latency]
        strict = (
            a["accuracy"] > b["accuracy"]
            or a["size_bytes"] < b["size_bytes"]
            or a[latency] < b[latency]
        )
        return ge and le and strict

    return [
        k
        for k, m in candidates.items()
        if not any(dominates(o, m) for j, o in candidates.items() if j != k)
    ]


def gate_results(gates: list[Gate], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Each gate on one candidate's metrics, with `missed_by` (in the metric's units) when it
    failed: how far the value is on the wrong side of the limit."""
    out = []
    for gate in gates:
        result = check(gate, {gate.model: metrics}).as_dict()
        if not result["passed"]:
            v = result["value"]
            result["missed_by"] = (
                None if v is None else abs(v - gate.limit) if gate.op not in ("==", "!=") else None
            )
        out.append(result)
    return out


def _ancestors(key: str, parents: dict[str, str | None]) -> list[str]:
    chain, seen = [], {key}
    while (key := parents.get(key)) is not None and key not in seen:  # type: ignore[assignment]
        chain.append(key)
        seen.add(key)
    return chain


def _no_better_than_ancestor(
    key: str, metrics: dict[str, dict], parents: dict[str, str | None], objective: str
) -> bool:
    first = OBJECTIVES[objective][0]
    if first == "accuracy":
        return False
    own = metrics[key]
    ancestors = _ancestors(key, parents)
    ci = own.get(_parent_ci(objective))
    if first != "size_bytes" and ci is not None:
        if verdict(*ci) != "faster":
            return True  # a latency objective wants it proven faster than its parent
        ancestors = ancestors[1:]  # the interval, not two medians, decides against the parent
    return any(own[first] >= metrics[a][first] for a in ancestors if a in metrics)


def _parent_ci(objective: str) -> str:
    return "parent_speedup_b32_ci" if objective == "latency_b32" else "parent_speedup_ci"


def _proven_slower(m: dict[str, Any], objective: str, max_slowdown: float) -> bool:
    """Slower than the model it came from by more than allowed, by the interval."""
    ci = m.get(_parent_ci(objective))
    return ci is not None and verdict(*ci, max_slowdown) == "slower"


def _miss(results: list[dict], gates: list[Gate]) -> tuple[int, float]:
    failed = [(r, g) for r, g in zip(results, gates, strict=True) if not r["passed"]]
    relative = sum(
        float("inf") if r.get("missed_by") is None else r["missed_by"] / max(abs(g.limit), 1e-12)
        for r, g in failed
    )
    return len(failed), relative


def choose(
    metrics: dict[str, dict[str, Any]],
    parents: dict[str, str | None],
    *,
    objective: str,
    gates: list[Gate],
    max_slowdown: float | None = None,
) -> Choice:
    """Choose among candidates (`metrics`: key -> their numbers, already relative to the
    teacher where gates need it, and to their parent where compared; `parents`: key -> the
    candidate it was derived from)."""
    latency = "latency_b32_ms" if objective == "latency_b32" else "latency_ms"
    front = pareto_front(metrics, latency)
    results = {k: gate_results(gates, m) for k, m in metrics.items()}
    excluded = [k for k in metrics if _no_better_than_ancestor(k, metrics, parents, objective)]
    slower = [
        k
        for k, m in metrics.items()
        if k not in excluded and _proven_slower(m, objective, max_slowdown or 1.0)
    ]
    excluded += slower
    eligible = [k for k in metrics if k not in excluded] or list(metrics)
    passing = [k for k in eligible if all(r["passed"] for r in results[k])]
    word = WORDS[objective]
    if passing:
        final = min(passing, key=lambda k: _score(objective, metrics[k]))
        reason = (
            f"the {word} of the {len(passing)} of {len(metrics)} candidates that pass every gate"
        )
    else:
        final = min(
            eligible,
            key=lambda k: (*_miss(results[k], gates), *_score(objective, metrics[k])),
        )
        n_failed = _miss(results[final], gates)[0]
        reason = (
            f"no candidate passes every gate: best effort, the one failing the fewest gates "
            f"({n_failed}) and missing them by the least, then the {word}"
        )
    if len(excluded) > len(slower):
        better = "smaller" if objective == "size" else "faster"
        n = len(excluded) - len(slower)
        reason += f"; {n} compression(s) not {better} than the model they came from were left out"
    if slower:
        reason += (
            f"; {len(slower)} compression(s) proven slower than the model they came from (the"
            f" 95% interval of the speedup from interleaved runs) were left out: {', '.join(slower)}"
        )
    return Choice(final, bool(passing), reason, front, results, excluded)


def relative(
    metrics: dict[str, Any],
    teacher: dict[str, Any],
    teacher_correct: Any = None,
    correct: Any = None,
    speed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A model's numbers against the teacher's: what gates and the choice read. With which
    test samples each got right, the accuracy drop gets its paired 95% interval; with
    interleaved comparisons (`speed`, from speed.evidence), the speedups over the teacher and
    over the parent get theirs."""
    out = dict(metrics)
    out["accuracy_drop"] = teacher["accuracy"] - metrics["accuracy"]
    if teacher_correct is not None and correct is not None:
        out["accuracy_drop_ci"] = list(paired_drop_ci(teacher_correct, correct))
    out["size_ratio"] = teacher["size_bytes"] / max(metrics["size_bytes"], 1)
    out["speedup"] = teacher["latency_ms"] / max(metrics["latency_ms"], 1e-9)
    if "latency_b32_ms" in metrics and "latency_b32_ms" in teacher:
        out["speedup_b32"] = teacher["latency_b32_ms"] / max(metrics["latency_b32_ms"], 1e-9)
    for against, prefix in (("teacher", "speedup"), ("parent", "parent_speedup")):
        for batch, suffix in (("b1", ""), ("b32", "_b32")):
            c = (speed or {}).get(against, {}).get(batch)
            if c is not None:
                out[f"{prefix}{suffix}_ci"] = c["ci"]
                out[f"{prefix}{suffix}_verdict"] = c["verdict"]
                if against == "parent":
                    out[f"{prefix}{suffix}"] = c["speedup"]
    if "speedup_ci" in out:
        out["speedup_lower"] = out["speedup_ci"][0]
    return out
