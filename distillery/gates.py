"""Gates over the metrics contract: `final.accuracy_drop<=0.01`, `final.size_ratio>=20`.

One evaluator for both kinds: a spec's `gates` block (checked by the runner, recorded in the
report and on the job) and the CLI's `--gate` flags. Pure Python, in the thin package: the
client and the CLI check gates with it, and worker/pipeline/report.py imports it from here.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Any

OPS = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": operator.eq,
    "!=": operator.ne,
}
MODELS = ("teacher", "baseline", "student", "pruned", "quantized", "final")
# Every model's measured numbers; `final` adds its ratios to the teacher.
MODEL_METRICS = ("accuracy", "params", "size_bytes", "latency_ms", "latency_p90_ms")
# `speedup` is the ratio of two medians; `speedup_lower` is the lower end of the 95% interval
# on it from interleaved runs of teacher and final on one host: what `min_speedup` tests.
FINAL_METRICS = (
    *MODEL_METRICS,
    "accuracy_drop",
    "size_ratio",
    "speedup",
    "speedup_lower",
    "distill_gain",
)
# A spec's gates block, as expressions over the contract (field -> metric, operator).
SPEC_GATES = {
    "max_accuracy_drop": ("final.accuracy_drop", "<="),
    "min_size_ratio": ("final.size_ratio", ">="),
    "min_speedup": ("final.speedup_lower", ">="),
    "min_accuracy": ("final.accuracy", ">="),
}
_GATE = re.compile(
    r"^\s*([a-z]+)\.([a-z_0-9]+)\s*(<=|>=|==|!=|<|>)\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Gate:
    expr: str
    model: str
    metric: str
    op: str
    limit: float
    name: str | None = None  # the spec field it came from (max_accuracy_drop, …), if any


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gate": self.gate.expr, "value": self.value, "passed": self.passed}
        if self.gate.name is not None:
            out["name"] = self.gate.name
        return out


def parse_gate(expr: str) -> Gate:
    """`MODEL.METRIC OP NUMBER`; raises ValueError naming what is wrong, including a metric
    the contract does not have (so a typo is refused before a job runs, not after)."""
    m = _GATE.match(expr)
    if m is None:
        raise ValueError(
            f"gate {expr!r}: expected MODEL.METRIC OP NUMBER, e.g. final.accuracy_drop<=0.01"
        )
    model, metric, op, limit = m.group(1), m.group(2), m.group(3), float(m.group(4))
    if model not in MODELS:
        raise ValueError(f"gate {expr!r}: unknown model {model!r}; known: {', '.join(MODELS)}")
    known = FINAL_METRICS if model == "final" else MODEL_METRICS
    if metric not in known:
        raise ValueError(
            f"gate {expr!r}: {model} has no metric {metric!r}; known: {', '.join(known)}"
        )
    return Gate(f"{model}.{metric}{op}{m.group(4)}", model, metric, op, limit)


def spec_gates(gates: Any) -> list[Gate]:
    """The gates a spec's `gates` block sets (a GatesSpec or its dict), in a fixed order."""
    values = gates if isinstance(gates, dict) else gates.model_dump()
    out = []
    for name, (metric, op) in SPEC_GATES.items():
        limit = values.get(name)
        if limit is not None:
            model, _, key = metric.partition(".")
            out.append(Gate(f"{metric}{op}{limit:g}", model, key, op, float(limit), name))
    return out


def check(gate: Gate, metrics: dict[str, Any]) -> GateResult:
    """A metric that was not measured fails its gate (a CI gate must not pass by omission)."""
    value = metrics.get(gate.model, {}).get(gate.metric)
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return GateResult(gate, None, False)
    return GateResult(gate, float(value), OPS[gate.op](value, gate.limit))


def check_all(gates: list[Gate], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [check(g, metrics).as_dict() for g in gates]
