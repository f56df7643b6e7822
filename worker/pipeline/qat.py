"""Quantization-aware distillation (`quantize.method: "qat"`).

The job's last float model is fine-tuned against the teacher, with the job's KD loss and the
shared training loop, while fake quantization sits in its graph: torch.ao's FX graph mode
fuses conv + batch norm + ReLU as int8 kernels run them, and puts an observer and a fake
quantizer on every weight and activation, so the weights learn to live with int8 rounding.
The trained model is then converted to int8 (torch's quantized modules) and exported by the
TorchScript ONNX exporter, which writes each quantized op as DequantizeLinear -> op ->
QuantizeLinear with int8 weight initializers: a QDQ model that ONNX Runtime fuses into int8
kernels (QLinearConv, QGemm), as it does the int8_static quantizer's.

The quantization scheme is int8_static's: uint8 asymmetric activations per tensor, int8
symmetric weights per channel (`per_channel`) or per tensor, 7 or 8 bits (`weight_bits`).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn
from torch.ao.quantization import (
    FakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_observer,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from worker.pipeline.context import StageContext
from worker.pipeline.data import DataBundle
from worker.pipeline.distill import TeacherSignal, finetune
from worker.pipeline.errors import SpecError
from worker.pipeline.export import export_onnx
from worker.pipeline.quantize import weight_bits
from worker.pipeline.spec import DistillSpec, QuantizeSpec


def qconfig(spec: QuantizeSpec) -> QConfig:
    """Fake quantizers for ONNX Runtime's int8 scheme (int8_static's settings)."""
    bits = weight_bits(spec)[0]
    # Symmetric over [-(2^(b-1) - 1), 2^(b-1) - 1], ONNX Runtime's own range for symmetric
    # weights: 7 bits keep u8 x s8 pair sums inside int16 on CPUs without VNNI (quantize.py).
    limit = 2 ** (bits - 1) - 1
    # Weights: min/max over the whole run, so the scale never falls below the final weights'
    # range (the int8 values stay within the width asked for).
    weight = FakeQuantize.with_args(
        observer=PerChannelMinMaxObserver if spec.per_channel else MinMaxObserver,
        quant_min=-limit,
        quant_max=limit,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric if spec.per_channel else torch.per_tensor_symmetric,
    )
    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    return QConfig(activation=activation, weight=weight)


def prepare(model: nn.Module, example: torch.Tensor, spec: QuantizeSpec) -> nn.Module:
    """A copy of `model` with fake quantization in its graph, in training mode."""
    m = copy.deepcopy(model).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's move to torchao
        try:
            return prepare_qat_fx(m, QConfigMapping().set_global(qconfig(spec)), (example,))
        except Exception as e:  # torch.fx cannot trace data-dependent control flow
            raise SpecError(
                f"quantize.method qat: the model cannot be traced by torch.fx for "
                f"quantization-aware training ({type(e).__name__}: {e}); use int8_static"
            ) from e


def export(prepared: nn.Module, example: torch.Tensor, dst: Path) -> Path:
    """The fine-tuned fake-quant model as an int8 QDQ ONNX model at `dst`."""
    m = copy.deepcopy(prepared).cpu().eval()
    m.apply(disable_observer)  # activation ranges: what training left them
    # The last optimizer step moved the weights after their observers last saw them: one pass
    # with only the weight observers on lets their scales cover the weights converted (else a
    # 7-bit layer can get a 64).
    for module in m.modules():
        if hasattr(module, "weight_fake_quant"):
            module.weight_fake_quant.enable_observer()
    with torch.no_grad():
        m(example.cpu())
    m.apply(disable_observer)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")  # torch.ao's and quantized tensors' deprecations
        raw = export_onnx(convert_fx(m), example.cpu(), Path(tmp) / "qat.onnx")
        # The exporter leaves zero points and biases as Constant/Cast chains: ONNX Runtime's
        # pre-pass folds them into initializers (what int8_static's files hold too).
        quant_pre_process(str(raw), str(dst), skip_symbolic_shape=True)
    return dst


def run(
    model: nn.Module,
    data: DataBundle,
    spec: QuantizeSpec,
    distill: DistillSpec,
    signal: TeacherSignal,
    ctx: StageContext,
    seed: int,
    dst: Path,
    tag: str = "qat",
) -> dict[str, float]:
    """Fine-tune a fake-quant copy of `model` against the teacher for `spec.qat_epochs` at
    `spec.qat_lr`, and write it to `dst` as int8 QDQ ONNX; returns the fine-tune's metrics.
    `model` itself is left as it was (it is the float model the job reports)."""
    example = data.x_train[:1].to(ctx.device)
    prepared = prepare(model.to(ctx.device).eval(), example, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # No mixed precision: fake quantization emulates int8 rounding of float32 values.
        parts = finetune(
            prepared,
            data,
            distill,
            signal,
            ctx,
            lr=spec.qat_lr,
            epochs=spec.qat_epochs,
            seed=seed,
            span=(0.0, 0.9),
            tag=tag,
            amp=False,
        )
    export(prepared, example, dst)
    return {f"qat_{k}": v for k, v in parts.items()}
