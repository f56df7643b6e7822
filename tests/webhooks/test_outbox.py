from app.webhooks.outbox import backoff


def test_backoff_grows_fourfold_within_a_quarter_either_way_and_is_capped():
    # base 5 s: attempt 3 waits 5 * 4^2 = 80 s, from 60 to 100 s with the jitter.
    assert backoff(3, base=5, cap=3600, rng=lambda: 0.0) == 60.0
    assert backoff(3, base=5, cap=3600, rng=lambda: 1.0) == 100.0
    assert backoff(1, base=5, cap=3600, rng=lambda: 0.5) == 5.0
    # attempt 9 would be 5 * 4^8 = 327,680 s: capped at an hour.
    assert backoff(9, base=5, cap=3600, rng=lambda: 0.5) == 3600.0
