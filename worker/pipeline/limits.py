"""Bounds on what a spec may ask for, and the structural half of checking them.

A spec names an arch and its keyword arguments; without bounds a 60 KB `hidden` list of
20,000 ones asks for a 20,000-layer model, and merely building it (even on the meta device)
took 19 s. The structural bounds here are checked on the JSON values alone, before any model
is built; the layer and parameter bounds are compared with a meta-device build in
`preflight`. Plain Python: the service checks uploads' arch_kwargs with it too.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import Any

from worker.pipeline.errors import SpecError


@dataclass(frozen=True)
class SpecLimits:
    """What one model of a spec may be. The defaults pass every shipped example and every
    torchvision arch in `archs.py` with room to spare (resnet50: 107 layers with weights,
    25.6 M parameters; efficientnet_b0: 131 layers)."""

    # Items in one list (or keys in one object) inside arch_kwargs. The built-ins take one
    # entry per layer; meta-building a 64-layer MLP or ConvNet takes ~0.1-0.2 s.
    max_list_length: int = 64
    # Containers inside containers within arch_kwargs (`{"hidden": [..]}` is 1 deep).
    max_nesting: int = 4
    # Modules holding parameters of their own (conv, linear, norm), counted on a meta build.
    max_layers: int = 500
    max_params: int = 100_000_000  # 400 MB of float32 weights
    # A search's candidates (the product of its axes): each is trained or measured.
    max_candidates: int = 64


def _describe(value: Any) -> str:
    return (
        f"a list of {len(value)} items"
        if isinstance(value, list | tuple)
        else (f"an object of {len(value)} keys")
    )


def check_structure(kwargs: dict[str, Any], *, where: str, limits: SpecLimits) -> None:
    """Refuse arch_kwargs whose lists are too long or nested too deep, naming the value's
    path under `where` (e.g. `student.arch_kwargs.hidden`). Walked without recursion."""
    pending: list[tuple[str, Any, int]] = [(where, kwargs, 0)]
    while pending:
        path, value, depth = pending.pop()
        if not isinstance(value, dict | list | tuple):
            continue
        if depth > limits.max_nesting:
            raise SpecError(
                f"{path}: nested {depth} levels deep; at most {limits.max_nesting} are allowed"
            )
        if len(value) > limits.max_list_length:
            raise SpecError(
                f"{path}: {_describe(value)}; at most {limits.max_list_length} are allowed"
            )
        if isinstance(value, dict):
            pending.extend((f"{path}.{k}", v, depth + 1) for k, v in value.items())
        else:
            pending.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))


# A dataset whose normalised float32 values fit in this many bytes is held as tensors (and on
# the training device): per-batch reads would only slow a digits-sized job down. Memory stays
# bounded: a job holds at most this, whatever the dataset's size.
RESIDENT_BYTES = 64 << 20


@dataclass(frozen=True)
class DataSettings:
    """How a job reads its data (Settings' DATA_WORKERS and DATA_MEMORY_BUDGET_BYTES)."""

    # DataLoader worker processes that decode images and read training batches; None: from
    # the host's cores (one left for the training loop itself).
    workers: int | None = None
    # What one prediction batch's activations may take; None: a sixteenth of the host's
    # memory (at most 512 MiB), or a quarter of the GPU's free memory on CUDA.
    memory_budget_bytes: int | None = None
    # Splits up to this size (float32) stay in memory; 0 streams every split.
    resident_bytes: int = RESIDENT_BYTES

    def resolved_workers(self) -> int:
        # A daemonic process (a multiprocessing pool's child) may not start processes of its
        # own: it reads in-process.
        if multiprocessing.current_process().daemon:
            return 0
        if self.workers is not None:
            return max(0, self.workers)
        return max(1, min(8, (os.cpu_count() or 1) - 1))

    def budget(self, device: Any) -> int:
        """Bytes one prediction batch's activations may take on `device` (a torch.device)."""
        if self.memory_budget_bytes is not None:
            return max(1, self.memory_budget_bytes)
        if device.type == "cuda":
            import torch  # here only: the API reads these settings without loading torch

            free, _ = torch.cuda.mem_get_info(device)
            return max(free // 4, 1 << 20)
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        # Batches past a few hundred images gain nothing on a CPU; the budget is a ceiling
        # on the job's peak, which other jobs on the host share.
        return min(host // 16, 512 << 20)
