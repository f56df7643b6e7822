"""Export: ONNX (the deployment format every number is measured on), TorchScript,
safetensors (+ arch and pruned layer shapes in its metadata), and sha256 of each file."""

from __future__ import annotations

import copy
import io
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.pipeline.archs import layer_config
from worker.pipeline.files import sha256_file
from worker.pipeline.registry import Registry

__all__ = ["EXPORTERS", "export_onnx", "export_safetensors", "export_torchscript", "sha256_file"]

ONNX_OPSET = 17


def _cpu_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to("cpu").float().eval()


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """fp32 ONNX with input `input`, output `logits` and a dynamic batch axis."""
    m = _cpu_copy(model) if not isinstance(model, torch.jit.ScriptModule) else model.cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter: sub-second on these models where the dynamo exporter
        # takes seconds each, and the job exports several models.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (example[:1].cpu().float(),),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    m = _cpu_copy(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # TorchScript is deprecated upstream but remains the format other runtimes (and our
        # teacher uploads) load without Python code; keep exporting it while torch does.
        traced = torch.jit.trace(m, example[:1].cpu().float())
        # Round-trip through a buffer so a half-written file never stays behind on failure.
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    path.write_bytes(buf.getvalue())
    return path


def export_safetensors(
    model: nn.Module,
    path: Path,
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    spec: dict | None = None,
) -> Path:
    """Weights plus what is needed to rebuild the module: arch name, its kwargs, and the
    (possibly pruned) shape of every layer. Loading never unpickles anything."""
    from safetensors.torch import save_file

    m = _cpu_copy(model)
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    meta = {
        "format": "pt",
        "arch": arch,
        "arch_kwargs": json.dumps(arch_kwargs),
        "layer_config": json.dumps(layer_config(m)),
    }
    if spec is not None:
        meta["spec"] = json.dumps(spec)
    save_file(state, str(path), metadata=meta)
    return path


def read_safetensors_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# What an export needs to know besides the model: arch, arch_kwargs, and the spec to embed.
ExportFn = Callable[[nn.Module, torch.Tensor, Path, dict[str, Any]], Path]


@dataclass(frozen=True)
class Exporter:
    run: ExportFn  # (model, one example input, destination, meta)
    filename: str
    format: str


EXPORTERS: Registry[Exporter] = Registry("export format")
EXPORTERS.add("onnx", Exporter(lambda m, x, p, meta: export_onnx(m, x, p), "model.onnx", "onnx"))
EXPORTERS.add(
    "torchscript",
    Exporter(
        lambda m, x, p, meta: export_torchscript(m, x, p), "model.torchscript.pt", "torchscript"
    ),
)
EXPORTERS.add(
    "safetensors",
    Exporter(
        lambda m, x, p, meta: export_safetensors(m, p, **meta), "model.safetensors", "safetensors"
    ),
)
