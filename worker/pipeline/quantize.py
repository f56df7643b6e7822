"""Quantize stage, on the ONNX model through ONNX Runtime quantization (the CPU deployment
path): int8 static (calibrated by min/max, entropy or percentile; QDQ, per-channel weights),
int8 dynamic, and fp16. `qat` is registered here too but trains: worker.pipeline.qat."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from worker.pipeline.registry import Registry
from worker.pipeline.samples import Samples, batches
from worker.pipeline.spec import QuantizeSpec
from worker.pipeline.speed import cpu_flags, int8_capability

QuantizeFn = Callable[[Path, Path, Samples, QuantizeSpec], None]


@dataclass(frozen=True)
class Quantizer:
    run: QuantizeFn  # (fp32 .onnx, destination, calibration inputs, spec)
    suffix: str  # the artifact is model.<suffix>.onnx
    format: str  # the artifact's format in listings
    # Fine-tunes the float model against the teacher (worker.pipeline.qat) instead of
    # quantizing an ONNX file: its caller hands it the model, the data and the teacher.
    trains: bool = False

    @property
    def filename(self) -> str:
        return f"model.{self.suffix}.onnx"


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
# int8_static's activation ranges: name -> (ONNX Runtime's method, its options from the spec).
CALIBRATIONS: Registry[tuple[CalibrationMethod, Callable[[QuantizeSpec], dict]]] = Registry(
    "calibration"
)
CALIBRATIONS.add("minmax", (CalibrationMethod.MinMax, lambda spec: {}))
CALIBRATIONS.add("entropy", (CalibrationMethod.Entropy, lambda spec: {}))
CALIBRATIONS.add(
    "percentile",
    (CalibrationMethod.Percentile, lambda spec: {"CalibPercentile": spec.calibration_percentile}),
)


def quantizer(name: str, *, suffix: str, format: str):
    """Register a quantizer: adding one is this decorator on one function."""

    def decorator(fn: QuantizeFn) -> QuantizeFn:
        QUANTIZERS.add(name, Quantizer(fn, suffix, format))
        return fn

    return decorator


class _Calibration(CalibrationDataReader):
    """The calibration samples a batch at a time, read (from disk, for a large dataset) only
    when ONNX Runtime asks for them."""

    def __init__(self, x: Samples, input_name: str, batch_size: int = 32) -> None:
        self._batches = (
            {input_name: xb.numpy().astype(np.float32)} for xb in batches(x, batch_size)
        )

    def get_next(self):
        return next(self._batches, None)


def _preprocessed(src: Path, tmp: Path) -> Path:
    """ORT's recommended pre-pass (shape inference, graph optimisation) before quantizing."""
    out = tmp / "pre.onnx"
    quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    return out


def weight_bits(spec: QuantizeSpec) -> tuple[int, str]:
    """The int8_static (and qat) weight width and where it came from: the spec's deployment target, or
    by default this worker's CPU (8 bits with VNNI, 7 without)."""
    if spec.weight_bits is not None:
        return spec.weight_bits, "quantize.weight_bits in the spec"
    vnni = int8_capability(cpu_flags())["vnni"]
    return (8, "this worker's CPU has VNNI") if vnni else (7, "this worker's CPU has no VNNI")


@quantizer("int8_static", suffix="int8", format="onnx-int8")
def int8_static(src: Path, dst: Path, calib: Samples, spec: QuantizeSpec) -> None:
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    method, options = CALIBRATIONS.get(spec.calibration)
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(
            str(_preprocessed(src, Path(tmp))),
            str(dst),
            _Calibration(calib, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=spec.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights for CPUs without VNNI: they multiply u8 x s8 with VPMADDUBSW, whose
            # int16 sums saturate (ONNX Runtime's quantization docs). On such an AMD EPYC the
            # digits teacher's int8 model agreed with its fp32 model on 95.8 % of the test set
            # with 8 bits and on at least 97 % with 7. With VNNI the sums are int32: 8 bits.
            reduce_range=weight_bits(spec)[0] == 7,
            calibrate_method=method,
            extra_options=options(spec),
        )


@quantizer("int8_dynamic", suffix="int8_dynamic", format="onnx-int8-dynamic")
def int8_dynamic(src: Path, dst: Path, calib: Samples, spec: QuantizeSpec) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(
            str(_preprocessed(src, Path(tmp))),
            str(dst),
            per_channel=spec.per_channel,
            weight_type=QuantType.QInt8,
        )


@quantizer("fp16", suffix="fp16", format="onnx-fp16")
def fp16(src: Path, dst: Path, calib: Samples, spec: QuantizeSpec) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Inputs and outputs stay float32 so the input contract does not change.
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def _trains(src: Path, dst: Path, calib: Samples, spec: QuantizeSpec) -> None:
    raise TypeError(f"{spec.method} fine-tunes the float model: call worker.pipeline.qat.run")


# Quantization-aware distillation: the float model fine-tuned with fake quantization against
# the teacher, exported as int8 QDQ (worker.pipeline.qat, which imports the training loop).
QUANTIZERS.add("qat", Quantizer(_trains, "int8_qat", "onnx-int8-qat", trains=True))


def run(src: Path, dst: Path, calib: Samples, spec: QuantizeSpec) -> Path:
    """Quantize the fp32 ONNX model at `src` with `spec.method` into `dst` (not `qat`: it
    needs the float model, worker.pipeline.qat.run)."""
    QUANTIZERS.get(spec.method).run(src, dst, calib, spec)
    return dst
