import pytest

from app.gates import check, parse_gate

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
