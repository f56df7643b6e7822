"""Quantize stage, on the ONNX model through ONNX Runtime quantization (the CPU deployment
path): int8 static (calibrated by min/max, entropy or percentile; QDQ, per-channel weights),
int8 dynamic, and fp16. `qat` is registered here too but trains: worker.pipeline.qat."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
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

    @property
    def int8(self) -> bool:
        """Runs int8 kernels (the report says whether that paid)."""
        return self.format.startswith("onnx-int8")


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
# int8_static's activation ranges: name -> (ONNX Runtime's calibrator, its options from the
# spec). Entropy searches 193 thresholds on a 512-bin histogram: ONNX Runtime's defaults (128
# bins, 128 quantized) leave one candidate, the whole range, i.e. min/max again; TensorRT's
# 2048 bins took 2 s per tensor on a shared 2-core EPYC, 512 take 0.3 s.
CALIBRATIONS: Registry[tuple[CalibrationMethod, Callable[[QuantizeSpec], dict]]] = Registry(
    "calibration"
)
CALIBRATIONS.add("minmax", (CalibrationMethod.MinMax, lambda spec: {}))
CALIBRATIONS.add(
    "entropy",
    (CalibrationMethod.Entropy, lambda spec: {"num_bins": 512, "num_quantized_bins": 128}),
)
CALIBRATIONS.add(
    "percentile",
    (CalibrationMethod.Percentile, lambda spec: {"percentile": spec.calibration_percentile}),
)


def quantizer(name: str, *, suffix: str, format: str):
    """Register a quantizer: adding one is this decorator on one function."""

    def decorator(fn: QuantizeFn) -> QuantizeFn:
        QUANTIZERS.add(name, Quantizer(fn, suffix, format))
        return fn

    return decorator


class _Calibration(CalibrationDataReader):
    """One batch of calibration samples, read (from disk, for a large dataset) only when ONNX
    Runtime asks for it. One per batch: its histogram collectors stack what one reader gives,
    and cannot when the last batch is smaller than the others."""

    def __init__(self, xb: torch.Tensor, input_name: str) -> None:
        self._batches = iter([{input_name: xb.numpy().astype(np.float32)}])

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


def _calibrated(
    model: Path, calib: Samples, spec: QuantizeSpec, tmp: Path, out: Path | None = None
) -> Path:
    """The activation ranges of `model` on the calibration samples by `spec.calibration`, as
    ONNX Runtime's calibration cache (a JSON file quantize_static reads instead of
    calibrating itself, which would pass the histogram calibrators no options), written to
    `out` (or into `tmp`)."""
    method, options = CALIBRATIONS.get(spec.calibration)
    calibrator = create_calibrator(
        model,
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=method,
        extra_options=options(spec),
    )
    input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    # The histogram calibrators print their progress: `distillery run --json` owns stdout.
    with contextlib.redirect_stdout(io.StringIO()):
        for xb in batches(calib, 32):  # each call adds to the ranges (or histograms) so far
            calibrator.collect_data(_Calibration(xb, input_name))
        out = out or tmp / "ranges.json"
        save_tensors_data(calibrator.compute_data(), out)
    return out


@quantizer("int8_static", suffix="int8", format="onnx-int8")
def int8_static(
    src: Path, dst: Path, calib: Samples, spec: QuantizeSpec, *, cache: Path | None = None
) -> None:
    """`spec.keep_float` nodes stay float. `cache`: a file for the calibrated ranges, made by
    the first call and read by the next (sensitivity quantizes one model many ways)."""
    with tempfile.TemporaryDirectory() as tmp:
        model = _preprocessed(src, Path(tmp))
        quantize_static(
            str(model),
            str(dst),
            None,
            nodes_to_exclude=list(spec.keep_float),
            calibration_cache_path=(
                cache
                if cache is not None and cache.is_file()
                else _calibrated(model, calib, spec, Path(tmp), out=cache)
            ),
            quant_format=QuantFormat.QDQ,
            per_channel=spec.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights for CPUs without VNNI: they multiply u8 x s8 with VPMADDUBSW, whose
            # int16 sums saturate (ONNX Runtime's quantization docs). On such an AMD EPYC the
            # digits teacher's int8 model agreed with its fp32 model on 95.8 % of the test set
            # with 8 bits and on at least 97 % with 7. With VNNI the sums are int32: 8 bits.
            reduce_range=weight_bits(spec)[0] == 7,
            calibrate_method=CALIBRATIONS.get(spec.calibration)[0],  # the cache's, checked
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
