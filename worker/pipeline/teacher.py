"""Teacher stage: train one from the spec, or load an uploaded one without unpickling it.

Accepted uploads: a TorchScript archive, an ONNX model (run through ONNX Runtime), or
safetensors weights plus a registered arch name. A `torch.save` pickle is refused even when
it is dressed up as one of these.
"""

from __future__ import annotations

import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from worker.pipeline.archs import build_model, count_params
from worker.pipeline.context import StageContext
from worker.pipeline.data import DataBundle
from worker.pipeline.errors import DatasetIncompatible, ModelLoadError
from worker.pipeline.init_weights import start_from
from worker.pipeline.losses import CrossEntropyOnly
from worker.pipeline.spec import (
    OnnxTeacher,
    SafetensorsTeacher,
    TorchScriptTeacher,
    TrainedTeacher,
)
from worker.pipeline.train import TrainConfig, accuracy, fit


class OnnxLogits:
    """A teacher served by ONNX Runtime: a callable from a torch batch to torch logits."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=_ort_providers())
        except Exception as e:
            raise ModelLoadError(f"{path.name}: not a loadable ONNX model ({_short(e)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(
                f"{path.name}: the ONNX model must take one input, it takes {len(inputs)}"
            )
        self.input_name = inputs[0].name
        self.input_shape = inputs[0].shape
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(
            None, {self.input_name: x.detach().cpu().numpy().astype(np.float32)}
        )[0]
        return torch.from_numpy(out).to(x.device)


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider"] if torch.cuda.is_available() else []
    return [p for p in wanted if p in available] + ["CPUExecutionProvider"]


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


@dataclass
class TeacherResult:
    logits_fn: nn.Module | OnnxLogits
    module: nn.Module | None  # torch module when there is one (feature losses, export)
    onnx_path: Path | None  # the uploaded ONNX file, measured as-is
    metrics: dict[str, float]
    arch: str | None = None
    arch_kwargs: dict | None = None


TORCHSCRIPT_MAX_EXPANSION = 8  # declared uncompressed bytes per archive byte, at most


def check_torchscript_archive(path: Path) -> None:
    """A TorchScript archive is a zip holding code/ and constants.pkl; torch.save output is a
    zip with data.pkl only. Refuse anything that is not the former before torch sees it."""
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path.name}: not a TorchScript archive (a zip from torch.jit.save); "
            "pickled checkpoints are refused"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            # torch.jit.save stores its records uncompressed, so a real archive expands to
            # about its own size. zipfile stops each member at its declared size, so capping
            # the declared total caps the CRC check's work on a compressed bomb.
            declared = sum(i.file_size for i in zf.infolist())
            size = path.stat().st_size
            if declared > TORCHSCRIPT_MAX_EXPANSION * size + (1 << 20):
                raise ModelLoadError(
                    f"{path.name}: archive would expand to {declared:,} bytes from "
                    f"{size:,}; a TorchScript archive stores its records "
                    "uncompressed, so this is refused"
                )
            bad = zf.testzip()  # CRC check: torch itself would load flipped weight bytes
    except (zipfile.BadZipFile, OSError, zlib.error) as e:
        raise ModelLoadError(f"{path.name}: corrupt TorchScript archive ({e})") from None
    if bad is not None:
        raise ModelLoadError(
            f"{path.name}: corrupt TorchScript archive (member {bad} fails its CRC)"
        )
    has_code = any("/code/" in n for n in names)
    has_constants = any(n.endswith("/constants.pkl") for n in names)
    if not (has_code and has_constants):
        raise ModelLoadError(
            f"{path.name}: a torch.save pickle, not a TorchScript archive; export the model "
            "with torch.jit.script/trace + torch.jit.save, or upload ONNX or safetensors"
        )


def load_torchscript(path: Path) -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    check_torchscript_archive(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated, still supported
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ModelLoadError(f"{path.name}: corrupt TorchScript archive ({_short(e)})") from None
    return module.eval()


def load_safetensors(path: Path, arch: str, arch_kwargs: dict, data: DataBundle) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from worker.pipeline.archs import apply_layer_config

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        state = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path.name}: not a safetensors file ({_short(e)})") from None
    model = build_model(arch, data.input_shape, data.num_classes, **arch_kwargs)
    if "layer_config" in meta:  # written by our own export after pruning
        import json

        apply_layer_config(model, json.loads(meta["layer_config"]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DatasetIncompatible(
            f"{path.name}: weights do not fit arch {arch!r} for input {list(data.input_shape)} "
            f"and {data.num_classes} classes ({_short(e)})"
        ) from None
    return model.eval()


def _probe(fn, data: DataBundle, device: torch.device, what: str) -> None:
    """Run one batch through an uploaded teacher to check it fits the dataset."""
    x = data.x_test[:2].to(device)
    try:
        with torch.no_grad():
            out = fn(x)
    except Exception as e:
        raise DatasetIncompatible(
            f"the {what} teacher cannot take this dataset's input {list(data.input_shape)}: {_short(e)}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != data.num_classes:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DatasetIncompatible(
            f"the {what} teacher outputs {shape}; the dataset has {data.num_classes} classes"
        )


def run(spec, data: DataBundle, ctx: StageContext, seed: int) -> TeacherResult:
    """Train or load the teacher; metrics hold its accuracy on the held-out split."""
    device = ctx.device
    if isinstance(spec, TrainedTeacher):
        torch.manual_seed(seed)
        model = build_model(spec.arch, data.input_shape, data.num_classes, **spec.arch_kwargs)
        init = start_from(model, spec.init, "teacher.init")
        cfg = TrainConfig(spec.epochs, spec.lr, spec.weight_decay, spec.batch_size, seed=seed)
        parts = fit(
            model,
            data.x_train,
            data.y_train,
            cfg=cfg,
            loss_fn=CrossEntropyOnly(),
            ctx=ctx,
            tag="teacher",
            val=data.val,
        )
        metrics = {
            "train_loss": parts.get("loss", float("nan")),
            "train_seconds": parts["train_seconds"],
            **init,
        }
        result = TeacherResult(model, model, None, metrics, spec.arch, dict(spec.arch_kwargs))
    elif isinstance(spec, TorchScriptTeacher):
        model = load_torchscript(Path(spec.path)).to(device)
        _probe(model, data, device, "TorchScript")
        result = TeacherResult(model, model, None, {})
    elif isinstance(spec, SafetensorsTeacher):
        model = load_safetensors(Path(spec.path), spec.arch, spec.arch_kwargs, data).to(device)
        _probe(model, data, device, "safetensors")
        result = TeacherResult(model, model, None, {}, spec.arch, dict(spec.arch_kwargs))
    elif isinstance(spec, OnnxTeacher):
        fn = OnnxLogits(Path(spec.path))
        _probe(fn, data, device, "ONNX")
        result = TeacherResult(fn, None, Path(spec.path), {})
    else:  # an upload id: only the service can resolve it to a file
        raise ModelLoadError(
            f"teacher source {getattr(spec, 'source', spec)!r} names a service upload; outside the "
            "service use source 'torchscript', 'onnx' or 'safetensors' with a path"
        )
    result.metrics["torch_accuracy"] = accuracy(result.logits_fn, data.x_test, data.y_test, device)
    if result.module is not None:
        result.metrics["params"] = count_params(result.module)
    ctx.progress(1.0, f"teacher accuracy {result.metrics['torch_accuracy']:.4f}")
    return result
