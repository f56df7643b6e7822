"""Speed proven, not assumed: interleaved comparisons, the CPU's int8 capability, why int8 did
not pay, and the per-operator profile, on a model small enough to time in a blink."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from worker.pipeline import speed
from worker.pipeline.choose import relative
from worker.pipeline.export import export_onnx
from worker.pipeline.quantize import QUANTIZERS, weight_bits
from worker.pipeline.spec import EvaluateSpec, QuantizeSpec
from worker.pipeline.stats import verdict

EPYC_NO_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\nbogomips: 4000\n"
XEON_VNNI = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni amx_int8 amx_tile\n"
ALDER_LAKE = "flags\t\t: fpu avx2 avx_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp\n"


@pytest.mark.parametrize(
    ("text", "vnni", "bits", "present"),
    [
        (EPYC_NO_VNNI, False, 7, {"avx2"}),
        (XEON_VNNI, True, 8, {"avx2", "avx512_vnni", "amx_int8"}),
        (ALDER_LAKE, True, 8, {"avx2", "avx_vnni"}),
        (ARM, False, 7, set()),
        ("", False, 7, set()),
    ],
)
def test_int8_capability_is_read_from_the_cpu_flags(text, vnni, bits, present):
    cap = speed.int8_capability(speed.cpu_flags(text))
    assert cap["vnni"] is vnni and cap["weight_bits"] == bits
    assert {f for f, on in cap["flags"].items() if on} == present


def test_weight_bits_follow_the_spec_else_this_cpu(monkeypatch):
    assert weight_bits(QuantizeSpec(weight_bits=8))[0] == 8
    assert weight_bits(QuantizeSpec(weight_bits=7))[0] == 7
    monkeypatch.setattr("worker.pipeline.quantize.cpu_flags", lambda: speed.cpu_flags(XEON_VNNI))
    assert weight_bits(QuantizeSpec()) == (8, "this worker's CPU has VNNI")
    monkeypatch.setattr("worker.pipeline.quantize.cpu_flags", lambda: speed.cpu_flags(EPYC_NO_VNNI))
    assert weight_bits(QuantizeSpec()) == (7, "this worker's CPU has no VNNI")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float model and its int8 version, each a few microseconds per run."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    ).eval()
    x = torch.randn(64, 1, 8, 8)
    d = tmp_path_factory.mktemp("speed")
    fp32 = export_onnx(model, x, d / "fp32.onnx")
    int8 = d / "int8.onnx"
    QUANTIZERS.get("int8_static").run(fp32, int8, x, QuantizeSpec(weight_bits=7))
    return fp32, int8, x[:1].numpy()


FAST = EvaluateSpec(latency_runs=5, latency_warmup=1, latency_b32_runs=4, compare_rounds=10)


def _gate_on(comparison: dict) -> bool:
    """`min_speedup: 1.2` on a final whose comparison with the teacher is `comparison`."""
    from distillery.gates import spec_gates
    from worker.pipeline.choose import gate_results

    teacher = {"accuracy": 0.9, "size_bytes": 100, "latency_ms": 1.0}
    final = relative(dict(teacher), teacher, speed={"teacher": comparison})
    return gate_results(spec_gates({"min_speedup": 1.2}), final)[0]["passed"]


def test_a_model_against_itself_is_not_faster_and_fails_min_speedup(tiny):
    fp32, _, sample = tiny
    c = speed.compare_spec(fp32, fp32, sample, FAST)
    assert set(c) == {"b1", "b32"}
    for batch in c.values():
        lo, hi = batch["ci"]
        # Never "faster" than itself; "slower" may come from a busy host, so it is not asserted.
        assert lo <= batch["speedup"] <= hi and batch["verdict"] != "faster"
        assert lo < 1.2  # what min_speedup 1.2 reads
    assert _gate_on(c) is False


def test_a_tiny_int8_model_is_not_faster_than_its_float_one_and_says_why(tiny):
    fp32, int8, sample = tiny
    c = speed.compare_spec(fp32, int8, sample, FAST)
    assert c["b1"]["verdict"] != "faster" and _gate_on(c) is False
    out = speed.int8_verdict("quantized", c["b1"]["a_ms"], int8, c["b1"])
    assert out["pays"] is False
    assert any("too small" in why for why in out["why"])
    # The input's quantize and the output's dequantize stay; nothing between float ops.
    assert out["qdq_nodes"]["in_file"] > out["qdq_nodes"]["after_fusion"] >= 2
    assert out["qdq_nodes"]["between_float_ops"] == 0 and out["qdq_nodes"]["int8_ops"] == 2


def test_why_not_faster_names_each_cause():
    no_vnni = speed.int8_capability(speed.cpu_flags(EPYC_NO_VNNI))
    qdq = {"between_float_ops": 6}
    why = speed.why_not_faster(no_vnni, 5.0, qdq)
    assert len(why) == 2 and "no VNNI" in why[0] and "6 QuantizeLinear/DequantizeLinear" in why[1]
    vnni = speed.int8_capability(speed.cpu_flags(XEON_VNNI))
    assert "too small" in speed.why_not_faster(vnni, 0.01, {"between_float_ops": 0})[0]


def test_an_interval_excluding_one_by_less_than_the_noise_is_no_difference():
    assert verdict(1.004, 1.006) == "not different"  # two sessions of one file differ so
    assert verdict(1.10, 1.20) == "faster" and verdict(0.40, 0.45) == "slower"
    assert verdict(0.40, 0.45, allowed_slowdown=3.0) == "not different"


def test_the_profile_is_time_per_operator_type(tiny):
    _, int8, sample = tiny
    p = speed.op_profile(int8, sample, runs=5, warmup=2)
    ops = {o["op_type"]: o for o in p["ops"]}
    assert {"QLinearConv", "QGemm", "QuantizeLinear"} <= set(ops)
    assert all(o["us_per_run"] > 0 and o["nodes"] >= 1 for o in p["ops"])
    assert sum(o["share"] for o in p["ops"]) == pytest.approx(1.0)


class _Timed:
    """A stand-in session whose every round takes `ms`, give or take 2%."""

    def __init__(self, ms: float, rng: np.random.Generator) -> None:
        self.ms, self.rng = ms, rng

    def get_inputs(self):
        return [type("Input", (), {"name": "input"})()]

    def run(self, *_):
        return None


@pytest.mark.parametrize("b_ms,rounds", [(1.0, 8), (4.0, 8), (2.0, 20)])
def test_a_comparison_stops_early_only_when_its_verdict_is_plain(monkeypatch, b_ms, rounds):
    """Twice as fast or twice as slow: decided at the first early look (8 rounds); the same
    speed: every round runs, and the interval is the 95% one of all of them."""
    rng = np.random.default_rng(0)
    sessions = iter([_Timed(2.0, rng), _Timed(b_ms, rng)])
    monkeypatch.setattr(speed, "session", lambda path, threads: next(sessions))
    monkeypatch.setattr(
        speed,
        "_round_ms",
        lambda sess, feed, runs: sess.ms * (1 + 0.02 * sess.rng.standard_normal()),
    )
    c = speed.compare("a.onnx", "b.onnx", np.zeros((1, 4), np.float32), rounds=20, runs=1)
    assert c["rounds"] == rounds
    assert c["verdict"] == {1.0: "faster", 4.0: "slower", 2.0: "not different"}[b_ms]
