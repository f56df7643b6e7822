"""CI gates over the metrics contract: `final.accuracy_drop<=0.01`, `final.size_ratio>=20`."""

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


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return {"gate": self.gate.expr, "value": self.value, "passed": self.passed}


def parse_gate(expr: str) -> Gate:
    m = _GATE.match(expr)
    if m is None:
        raise ValueError(
            f"gate {expr!r}: expected MODEL.METRIC OP NUMBER, e.g. final.accuracy_drop<=0.01"
        )
    model, metric, op, limit = m.group(1), m.group(2), m.group(3), float(m.group(4))
    if model not in MODELS:
        raise ValueError(f"gate {expr!r}: unknown model {model!r}; known: {', '.join(MODELS)}")
    return Gate(f"{model}.{metric}{op}{m.group(4)}", model, metric, op, limit)


def check(gate: Gate, metrics: dict[str, Any]) -> GateResult:
    """A metric that was not measured fails its gate (a CI gate must not pass by omission)."""
    value = metrics.get(gate.model, {}).get(gate.metric)
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return GateResult(gate, None, False)
    return GateResult(gate, float(value), OPS[gate.op](value, gate.limit))
