import pytest

from distillery.gates import check, parse_gate, spec_gates

METRICS = {
    "final": {"accuracy": 0.97, "accuracy_drop": 0.012, "size_ratio": 25.0},
    "teacher": {"accuracy": 0.982},
}


@pytest.mark.parametrize(
    "expr,passed,value",
    [
        ("final.accuracy_drop<=0.02", True, 0.012),
        ("final.accuracy_drop<=0.01", False, 0.012),
        ("final.size_ratio>=20", True, 25.0),
        ("final.size_ratio > 30", False, 25.0),
        ("teacher.accuracy==0.982", True, 0.982),
        ("final.accuracy!=1", True, 0.97),
        ("final.accuracy<1e-3", False, 0.97),
    ],
)
def test_gates_compare_the_measured_value(expr, passed, value):
    result = check(parse_gate(expr), METRICS)
    assert result.passed is passed and result.value == value


def test_an_unmeasured_metric_fails_its_gate():
    result = check(parse_gate("pruned.accuracy>=0.5"), METRICS)
    assert result.passed is False and result.value is None


@pytest.mark.parametrize(
    "expr",
    ["final.accuracy=>0.9", "accuracy>=0.9", "final.accuracy>=high", "student.acc>=0.9;rm -rf /"],
)
def test_malformed_gates_are_refused(expr):
    with pytest.raises(ValueError, match="expected MODEL.METRIC OP NUMBER"):
        parse_gate(expr)
    with pytest.raises(ValueError, match="unknown model 'model'"):
        parse_gate("model.accuracy>=1")


@pytest.mark.parametrize(
    "expr,known",
    [("final.acuracy>=0.9", "accuracy_drop"), ("teacher.size_ratio>=2", "latency_ms")],
)
def test_a_metric_the_contract_lacks_is_refused_with_the_known_names(expr, known):
    # size_ratio exists only on `final` (it is a ratio to the teacher).
    with pytest.raises(ValueError, match="has no metric") as e:
        parse_gate(expr)
    assert known in str(e.value)


def test_a_specs_gates_block_is_the_same_kind_of_gate():
    gates = spec_gates({"max_accuracy_drop": 0.01, "min_size_ratio": 30, "min_speedup": None})
    assert [(g.expr, g.name) for g in gates] == [
        ("final.accuracy_drop<=0.01", "max_accuracy_drop"),
        ("final.size_ratio>=30", "min_size_ratio"),
    ]
    results = [check(g, METRICS) for g in gates]
    assert [r.passed for r in results] == [False, False]  # 0.012 > 0.01 and 25 < 30
    assert results[0].as_dict() == {
        "gate": "final.accuracy_drop<=0.01",
        "value": 0.012,
        "passed": False,
        "name": "max_accuracy_drop",
    }
