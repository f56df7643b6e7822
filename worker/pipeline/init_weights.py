"""Starting weights a user brings for a student (or a trained teacher): a safetensors file
for the same arch.

Checked from the file's header alone (names, shapes; no tensor read) against the model the
job builds, so a mismatch fails at POST with the names of the tensors that do not fit. The
classifier head (the model's last linear layer) is the one exception: when the file was
trained for another number of classes it is left out and the model keeps its fresh head.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from worker.pipeline.errors import ModelLoadError, SpecError
from worker.pipeline.spec import InitSpec, SafetensorsInit

# name -> shape. A safetensors header is JSON after its own 8-byte little-endian length; the
# format caps it at 100 MB, ours at less: a model within the spec limits needs far fewer.
Header = dict[str, tuple[int, ...]]
MAX_HEADER_BYTES = 16 * 1024**2
SHOWN = 8  # names listed per kind of mismatch


def parse_header(read: Callable[[int, int], bytes], what: str) -> Header:
    """The tensors a safetensors file declares, read through `read(start, length)` (a local
    file, or a range of an object in the store). Raises ModelLoadError on anything else."""
    head = read(0, 8)
    if len(head) != 8:
        raise ModelLoadError(f"{what}: not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", head)
    if not 2 <= size <= MAX_HEADER_BYTES:
        raise ModelLoadError(f"{what}: not a safetensors file (header of {size} bytes)")
    raw = read(8, size)
    try:
        entries = json.loads(raw)
        header = {
            name: tuple(int(d) for d in entry["shape"])
            for name, entry in entries.items()
            if name != "__metadata__"
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ModelLoadError(f"{what}: not a safetensors file (unreadable header)") from None
    if not header:
        raise ModelLoadError(f"{what}: holds no tensors")
    return header


def file_header(path: Path) -> Header:
    if not path.is_file():
        raise ModelLoadError(f"{path.name}: no such file")
    with open(path, "rb") as f:

        def read(start: int, length: int) -> bytes:
            f.seek(start)
            return f.read(length)

        return parse_header(read, path.name)


@dataclass
class InitPlan:
    """Which tensors of the file go into the model, and which head tensors are replaced."""

    load: list[str]
    replaced: list[str] = field(default_factory=list)

    @property
    def head_replaced(self) -> bool:
        return bool(self.replaced)


def head_of(model: nn.Module) -> str:
    """The classifier head: the last linear layer (`classifier`, `fc`, `classifier.3`, …)."""
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return heads[-1] if heads else ""


def _optional(name: str) -> bool:
    # BatchNorm's step counter: only used with momentum=None; files from other tools omit it.
    return name.endswith("num_batches_tracked")


def _names(items: list[str]) -> str:
    more = f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def plan_init(model: nn.Module, header: Header, where: str) -> InitPlan:
    """Match the file's tensors to `model` (built for the job's data; the meta device will
    do). Raises SpecError naming every tensor that does not fit, the head excepted."""
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = head_of(model)
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    plan = InitPlan(load=[])
    differ, missing = [], []
    for name, shape in wanted.items():
        got = header.get(name)
        if got is None:
            if name in head_keys:
                plan.replaced.append(name)
            elif not _optional(name):
                missing.append(name)
        elif got == shape:
            plan.load.append(name)
        elif name in head_keys and got[1:] == shape[1:]:
            plan.replaced.append(name)  # same features in, another number of classes out
        else:
            differ.append(f"{name} {list(got)} in the file vs {list(shape)} in the model")
    extra = [n for n in header if n not in wanted]
    problems = []
    if differ:
        problems.append(f"shapes differ: {_names(differ)}")
    if missing:
        problems.append(f"missing from the file: {_names(missing)}")
    if extra:
        problems.append(f"not in the model: {_names(extra)}")
    if problems:
        raise SpecError(f"{where}: the weights do not fit the model; " + "; ".join(problems))
    return plan


def load_init(model: nn.Module, path: Path, where: str) -> dict[str, Any]:
    """Copy the file's tensors into `model` (never unpickling: safetensors); returns what the
    report says about it."""
    from safetensors import SafetensorError, safe_open

    plan = plan_init(model, file_header(path), where)
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in plan.load}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path.name}: not a safetensors file ({e})") from None
    model.load_state_dict(tensors, strict=False)
    return {
        "tensors_loaded": len(plan.load),
        "head_replaced": plan.head_replaced,
        "replaced": plan.replaced,
    }


def start_from(model: nn.Module, init: InitSpec | None, where: str) -> dict[str, float]:
    """Load the starting weights `init` names into `model` (nothing when None); returns the
    stage metrics that say so: tensors loaded, and 1.0 when the head was replaced."""
    if init is None:
        return {}
    if not isinstance(init, SafetensorsInit):  # an upload id: only the service resolves it
        raise ModelLoadError(
            f"{where}: source {init.source!r} names a service upload; outside the service "
            "use source 'safetensors' with a path"
        )
    info = load_init(model, Path(init.path), where)
    return {
        "init_tensors_loaded": float(info["tensors_loaded"]),
        "init_head_replaced": float(info["head_replaced"]),
    }
