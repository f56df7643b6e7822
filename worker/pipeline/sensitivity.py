"""Per-node sensitivity of int8 static quantization, and accuracy-controlled PTQ.

Sensitivity: from the fully quantized model, each node in turn is returned to float (every
other node stays int8) and a sample of the validation split is scored: the accuracy it
recovers, and the SNR of its logits against the fp32 model's. "Only this node left in float"
rather than "only this node quantized" because that is the move accuracy control makes with
the ranking (it returns nodes to float from the int8 model), so the ranking measures exactly
that move, with the other nodes' errors around it as they will be (NNCF's
quantize_with_accuracy_control ranks the same way).

Accuracy control: when the fully quantized model loses more than the budget against its float
model on the validation sample, nodes go back to float in the ranking's order, one at a time,
until the loss is within it (or the ranked nodes are spent: then the variant that lost least).

Every variant is one `quantize_static` call with `nodes_to_exclude`, from ranges calibrated
once (ONNX Runtime's calibration cache): no graph is edited by hand.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization.registry import QDQRegistry

from worker.pipeline.context import StageContext
from worker.pipeline.errors import SpecError
from worker.pipeline.evaluate import onnx_logits
from worker.pipeline.quantize import int8_static
from worker.pipeline.samples import Samples, Split
from worker.pipeline.spec import QuantizeSpec, SensitivitySpec

JSON_FILE, CSV_FILE = "sensitivity.json", "sensitivity.csv"
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}  # scored first when nodes are capped
SNR_CAP_DB = 200.0  # identical logits: a finite number JSON can carry
CSV_COLUMNS = [
    "rank",
    "node",
    "op_type",
    "params",
    "recovered",
    "accuracy",
    "accuracy_drop",
    "snr_db",
    "snr_gain_db",
]


@dataclass(frozen=True)
class Node:
    name: str
    op_type: str
    params: int  # elements of the initializers it reads (its weights and bias)


def quantizable_nodes(path: Path) -> list[Node]:
    """The nodes of the ONNX model at `path` that ONNX Runtime's QDQ quantizer handles, in
    graph order: the names `quantize.keep_float` takes."""
    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer}
    return [
        Node(n.name, n.op_type, sum(sizes.get(i, 0) for i in n.input))
        for n in model.graph.node
        if n.op_type in QDQRegistry and n.name
    ]


def check_keep_float(names: list[str], nodes: list[Node]) -> None:
    """SpecError (invalid_spec) naming the unknown names and the known ones."""
    known = [n.name for n in nodes]
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        shown = ", ".join(known[:64]) + (f" and {len(known) - 64} more" if len(known) > 64 else "")
        raise SpecError(
            f"quantize.keep_float: unknown node {', '.join(map(repr, unknown))}; "
            f"the model's quantizable nodes are: {shown}"
        )


def snr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """Signal-to-noise ratio of `output` against `reference`, in dB (higher: closer)."""
    noise = float(np.sum((reference.astype(np.float64) - output) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0.0:
        return SNR_CAP_DB
    return min(SNR_CAP_DB, 10.0 * math.log10(max(signal, 1e-30) / noise))


def val_sample(x: Samples, y: torch.Tensor, n: int, seed: int) -> tuple[Samples, np.ndarray]:
    """At most `n` rows of the validation split, seeded (all of it when it is no larger)."""
    if len(x) <= n:
        return x, y.numpy()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    idx = idx.sort().values
    rows = x.subset(idx.numpy()) if isinstance(x, Split) else x[idx]
    return rows, y[idx].numpy()


@dataclass(frozen=True)
class Score:
    accuracy: float
    snr_db: float


class Trials:
    """One float ONNX model quantized many ways (each a set of nodes kept float), calibrated
    once, each scored on the same validation sample against the fp32 logits."""

    def __init__(
        self,
        src: Path,
        calib: Samples,
        spec: QuantizeSpec,
        x: Samples,
        y: np.ndarray,
        work: Path,
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.calib, self.spec, self.x, self.y = work, calib, spec, x, y
        # ONNX Runtime's pre-pass (inside int8_static) keeps these names.
        self.model = src
        self.nodes = quantizable_nodes(self.model)
        self.cache = work / "calibration.json"
        self.cache.unlink(missing_ok=True)  # ranges of another model must not be read
        self.reference = onnx_logits(self.model, x)
        self.float_accuracy = float((self.reference.argmax(1) == y).mean())
        self.runs = 0

    def quantize(self, keep: list[str], dst: Path) -> Path:
        """The model with `keep` in float, every other quantizable node int8."""
        spec = self.spec.model_copy(update={"keep_float": list(keep)})
        int8_static(self.model, dst, self.calib, spec, cache=self.cache)
        return dst

    def score(self, keep: list[str]) -> Score:
        path = self.quantize(keep, self.work / "trial.onnx")
        logits = onnx_logits(path, self.x)
        self.runs += 1
        return Score(float((logits.argmax(1) == self.y).mean()), snr_db(self.reference, logits))


@dataclass
class Sensitivity:
    """Each scored node with what returning it alone to float did, best first."""

    rows: list[dict[str, Any]]
    quantized: Score  # every node int8 (but the spec's keep_float)
    float_accuracy: float
    samples: int
    skipped: list[str] = field(default_factory=list)  # over max_nodes
    not_reached: list[str] = field(default_factory=list)  # out of time
    seconds: float = 0.0

    @property
    def ranking(self) -> list[str]:
        return [r["node"] for r in self.rows]


def _order(nodes: list[Node]) -> list[Node]:
    """Weighted nodes first (where int8 shrinks and speeds the model), then the rest; graph
    order within each."""
    return [n for n in nodes if n.op_type in WEIGHTED] + [
        n for n in nodes if n.op_type not in WEIGHTED
    ]


def measure(
    trials: Trials,
    settings: SensitivitySpec,
    keep: list[str],
    quantized: Score,
    on_node: Callable[[int, int], None] = lambda i, n: None,
) -> Sensitivity:
    """Score each node not in `keep` (at most `settings.max_nodes`, within
    `settings.max_seconds`) by returning it alone to float; rank by accuracy recovered, then
    by the SNR gained (on a small sample many nodes recover the same number of samples)."""
    t0 = time.monotonic()
    order = _order([n for n in trials.nodes if n.name not in keep])
    scored, skipped = order[: settings.max_nodes], [n.name for n in order[settings.max_nodes :]]
    rows, not_reached = [], []
    for i, node in enumerate(scored):
        if time.monotonic() - t0 > settings.max_seconds:
            not_reached.append(node.name)
            continue
        s = trials.score([*keep, node.name])
        rows.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "params": node.params,
                "recovered": s.accuracy - quantized.accuracy,
                "accuracy": s.accuracy,
                "accuracy_drop": trials.float_accuracy - s.accuracy,
                "snr_db": s.snr_db,
                "snr_gain_db": s.snr_db - quantized.snr_db,
            }
        )
        on_node(i + 1, len(scored))
    rows.sort(key=lambda r: (-r["recovered"], -r["snr_gain_db"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return Sensitivity(
        rows,
        quantized,
        trials.float_accuracy,
        len(trials.y),
        skipped,
        not_reached,
        time.monotonic() - t0,
    )


@dataclass
class Control:
    """What accuracy control did: the budget, each step, the nodes it left in float."""

    budget: float
    met: bool
    keep_float: list[str]
    steps: list[dict[str, Any]]


def control(
    trials: Trials, ranking: list[str], keep: list[str], quantized: Score, budget: float
) -> Control:
    """Return nodes to float in `ranking`'s order until the validation loss against the float
    model is within `budget`; when it never is, the variant that lost least (fewest nodes on
    a tie)."""
    float_acc = trials.float_accuracy
    kept = list(keep)
    steps = [{"float_nodes": len(kept), "accuracy": quantized.accuracy, "snr_db": quantized.snr_db}]
    best = (float_acc - quantized.accuracy, list(kept))
    for name in ranking:
        if best[0] <= budget:
            break
        kept.append(name)
        s = trials.score(kept)
        steps.append(
            {"float_nodes": len(kept), "node": name, "accuracy": s.accuracy, "snr_db": s.snr_db}
        )
        if float_acc - s.accuracy < best[0]:
            best = (float_acc - s.accuracy, list(kept))
    for step in steps:
        step["accuracy_drop"] = float_acc - step["accuracy"]
    return Control(budget, best[0] <= budget, best[1], steps)


def float_share(nodes: list[Node], keep: list[str]) -> dict[str, float]:
    """The share of the quantizable weights, and of the quantizable nodes, left in float."""
    kept = set(keep)
    total = sum(n.params for n in nodes)
    in_float = sum(n.params for n in nodes if n.name in kept)
    return {
        "float_share": in_float / total if total else 0.0,
        "float_node_share": len(kept) / len(nodes) if nodes else 0.0,
    }


def write(out: Path, sens: Sensitivity, extra: dict[str, Any]) -> None:
    """sensitivity.json (what was sampled, the ranking, what was left out) and .csv (the rows)."""
    doc = {
        "method": "each node returned alone to float from the int8 model; scored on a sample "
        "of the validation split against the fp32 model",
        "samples": sens.samples,
        "float_accuracy": sens.float_accuracy,
        "quantized": asdict(sens.quantized),
        "nodes": sens.rows,
        "skipped": sens.skipped,
        "not_reached": sens.not_reached,
        "seconds": sens.seconds,
        **extra,
    }
    (out / JSON_FILE).write_text(json.dumps(doc, indent=2))
    with (out / CSV_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sens.rows)


def _top(sens: Sensitivity) -> list[dict[str, Any]]:
    """The ranking as the job's stage metrics carry it (the CLI's table, the dashboard's
    chart): the columns that say what each node costs."""
    keys = ("rank", "node", "op_type", "recovered", "accuracy_drop", "snr_db")
    return [{k: r[k] for k in keys} for r in sens.rows]


def run(
    src: Path,
    dst: Path,
    calib: Samples,
    spec: QuantizeSpec,
    *,
    budget: float | None,
    val: tuple[Samples, torch.Tensor] | None,
    seed: int,
    work: Path,
    out: Path,
    ctx: StageContext,
) -> dict[str, Any]:
    """int8_static into `dst` with `spec.keep_float` checked against the model; sensitivity
    (into `out`) when the spec asks for it or the budget needs it; accuracy control when there
    is a `budget` and a validation split. Returns the stage's metrics: the nodes left in float,
    their share, the ranking and what accuracy control did."""
    nodes = quantizable_nodes(src)
    check_keep_float(spec.keep_float, nodes)
    keep = list(spec.keep_float)
    if val is None or (budget is None and spec.sensitivity is None):
        int8_static(src, dst, calib, spec)
        return {"float_nodes": keep, "quantizable_nodes": len(nodes), **float_share(nodes, keep)}
    settings = spec.sensitivity or SensitivitySpec()
    x, y = val_sample(*val, settings.samples, seed)
    trials = Trials(src, calib, spec, x, y, work)
    quantized = trials.score(keep)
    drop = trials.float_accuracy - quantized.accuracy
    metrics: dict[str, Any] = {"quantizable_nodes": len(nodes), "val_samples": len(y)}
    sens = None
    if spec.sensitivity is not None or (budget is not None and drop > budget):
        if budget is not None and drop > budget:
            ctx.log(
                f"int8 lost {drop:.4f} on {len(y)} validation samples, over the budget "
                f"{budget:.4f}: scoring each node"
            )
        sens = measure(
            trials, settings, keep, quantized, lambda i, n: ctx.progress(i / (n + 1), "sensitivity")
        )
        metrics["sensitivity"] = _top(sens)
    if budget is not None:
        ctrl = control(trials, sens.ranking if sens else [], keep, quantized, budget)
        keep = ctrl.keep_float
        metrics["accuracy_control"] = {
            "budget": budget,
            "met": ctrl.met,
            "float_val_accuracy": trials.float_accuracy,
            "val_accuracy_drop_whole": drop,
            "val_accuracy_drop": min(s["accuracy_drop"] for s in ctrl.steps),
            "steps": ctrl.steps,
        }
        if not ctrl.met:
            ctx.log(f"accuracy control: no variant within {budget:.4f}; keeping the closest")
    trials.quantize(keep, dst)
    share = float_share(nodes, keep)
    if sens is not None:
        write(
            out,
            sens,
            {"float_nodes": keep, **share, "accuracy_control": metrics.get("accuracy_control")},
        )
    return {**metrics, "float_nodes": keep, **share, "trials": trials.runs}
