import numpy as np
import onnx
import pytest

from worker.pipeline import quantize
from worker.pipeline.evaluate import measure, onnx_logits
from worker.pipeline.export import export_onnx
from worker.pipeline.registry import UnknownName
from worker.pipeline.spec import QuantizeSpec


@pytest.fixture(scope="module")
def fp32(digits, trained_teacher, tmp_path_factory):
    return export_onnx(
        trained_teacher.module, digits.x_test, tmp_path_factory.mktemp("q") / "fp32.onnx"
    )


@pytest.mark.parametrize(
    "method,max_ratio", [("int8_static", 0.45), ("int8_dynamic", 0.45), ("fp16", 0.6)]
)
def test_quantized_model_is_smaller_and_agrees_with_fp32(
    digits, fp32, tmp_path, method, max_ratio, fast_eval
):
    dst = quantize.run(
        fp32, tmp_path / f"{method}.onnx", digits.calibration(128, 0), QuantizeSpec(method=method)
    )
    ref = onnx_logits(fp32, digits.x_test).argmax(1)
    got = onnx_logits(dst, digits.x_test).argmax(1)
    assert (ref == got).mean() >= 0.97
    assert dst.stat().st_size < max_ratio * fp32.stat().st_size
    m = measure(dst, digits.x_test, digits.y_test, fast_eval)
    assert m["latency_ms"] > 0 and m["accuracy"] > 0.8


def test_int8_static_stores_int8_weights(digits, fp32, tmp_path):
    dst = quantize.run(fp32, tmp_path / "q.onnx", digits.calibration(64, 0), QuantizeSpec())
    model = onnx.load(str(dst))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = [
        t
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1
    ]
    assert int8, "conv/linear weights should be stored as int8"
    # Input contract unchanged: float32 in, float32 logits out.
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_keeps_float32_inputs(digits, fp32, tmp_path):
    dst = quantize.run(
        fp32, tmp_path / "h.onnx", digits.calibration(8, 0), QuantizeSpec(method="fp16")
    )
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert np.isfinite(onnx_logits(dst, digits.x_test)).all()


def test_unknown_quantizer_lists_known():
    with pytest.raises(UnknownName, match="fp16, int8_dynamic, int8_static"):
        quantize.QUANTIZERS.get("int4")


def _activation_scales(path) -> dict[str, float]:
    """The scale of every activation QuantizeLinear (weights are stored quantized)."""
    model = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.input[0]: float(init[n.input[1]])
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in init
    }


def test_each_calibration_method_makes_a_model_with_its_own_ranges(digits, fp32, tmp_path):
    calib = digits.calibration(50, 0)  # two batches, the last one smaller
    ref = onnx_logits(fp32, digits.x_test).argmax(1)
    scales = {}
    for method in ("minmax", "entropy", "percentile"):
        spec = QuantizeSpec(calibration=method, calibration_percentile=99.9)
        dst = quantize.run(fp32, tmp_path / f"{method}.onnx", calib, spec)
        assert (onnx_logits(dst, digits.x_test).argmax(1) == ref).mean() >= 0.95, method
        scales[method] = _activation_scales(dst)
    assert scales["minmax"].keys() == scales["entropy"].keys() == scales["percentile"].keys()
    # Min/max spans every calibration value; the others clip the tails: smaller ranges.
    for method in ("entropy", "percentile"):
        smaller = [k for k, v in scales[method].items() if v < scales["minmax"][k] * 0.999]
        assert smaller, f"{method} calibrated exactly as minmax did"


def test_qat_is_not_a_file_quantizer(digits, fp32, tmp_path):
    with pytest.raises(TypeError, match="worker.pipeline.qat.run"):
        quantize.run(
            fp32, tmp_path / "q.onnx", digits.calibration(8, 0), QuantizeSpec(method="qat")
        )
