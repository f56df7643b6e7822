"""The intervals against values computed by hand or by an independent method."""

import numpy as np
import pytest

from worker.pipeline.stats import paired_drop_ci, wilson


def test_wilson_matches_the_textbook_values():
    # 8 of 10: the Wilson 95% interval is [0.490, 0.943] (Newcombe 1998, Table I style).
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    # All correct on 20 samples: the interval still admits errors (upper bound 1, lower < 1).
    lo, hi = wilson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-4)


def test_a_paired_interval_is_tight_when_the_models_agree_and_centred_on_the_drop():
    rng = np.random.default_rng(1)
    teacher = rng.random(400) < 0.9
    model = teacher.copy()
    flip = np.flatnonzero(teacher)[:20]  # the model misses 20 samples the teacher got: 5 points
    model[flip] = False
    lo, hi = paired_drop_ci(teacher, model)
    assert lo < 0.05 < hi and lo > 0.02 and hi < 0.08
    # Unpaired, the two accuracies' own intervals are each ~3 points wide on either side.
    t_lo, t_hi = wilson(int(teacher.sum()), 400)
    assert hi - lo < (t_hi - t_lo)


def test_identical_models_lose_nothing():
    same = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
    assert paired_drop_ci(same, same) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_drop_ci(same, same[:3])


def test_the_speedup_interval_is_seeded_and_holds_the_ratio():
    from worker.pipeline.stats import ratio_interval

    rng = np.random.default_rng(1)
    log_ratios = np.log(2.0) + rng.normal(0, 0.1, size=20)
    ratio, lo, hi = ratio_interval(log_ratios, seed=3)
    assert (ratio, lo, hi) == ratio_interval(log_ratios, seed=3)  # same rounds, same interval
    assert lo < ratio < hi and lo > 1.8 and hi < 2.2
    # Every round saying the same: the interval is that one value.
    assert ratio_interval(np.full(10, np.log(0.5)))[1:] == pytest.approx((0.5, 0.5))
