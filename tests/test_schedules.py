"""Schedules are pure functions of the step (larp-spec 2.4, 3.2)."""
import math

import pytest

from tokenizer_training.schedules import disc_step_due, lr_multiplier, ss_ratio


def test_warmup_starts_at_min_mult_and_reaches_one():
    assert lr_multiplier(0, 1000, 100, 0.01) == pytest.approx(0.01)
    assert lr_multiplier(50, 1000, 100, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_multiplier(100, 1000, 100, 0.01) == pytest.approx(1.0)
    warm = [lr_multiplier(s, 1000, 100) for s in range(101)]
    assert all(b > a for a, b in zip(warm, warm[1:]))


def test_cosine_ends_at_min_mult_and_is_monotone():
    values = [lr_multiplier(s, 1000, 100, 0.01) for s in range(100, 1001)]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))
    assert lr_multiplier(1000, 1000, 100, 0.01) == pytest.approx(0.01)
    assert lr_multiplier(5000, 1000, 100, 0.01) == pytest.approx(0.01)  # constant after the end
    mid = 100 + 900 // 2
    assert lr_multiplier(mid, 1000, 100, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_multiplier(550, 1000, 100, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_warmup_and_all_warmup():
    assert lr_multiplier(0, 10, 0) == 1.0
    assert lr_multiplier(9, 10, 10) < 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_multiplier(0, 10, 11)
    with pytest.raises(ValueError, match="total_steps"):
        lr_multiplier(0, 0, 0)


def test_ss_ratio_ramps_to_max_over_peak_fraction():
    total = 1000
    assert ss_ratio(0, total, 0.3, 0.5) == 0.0
    assert ss_ratio(150, total, 0.3, 0.5) == pytest.approx(0.25)  # half of the 30% ramp
    assert ss_ratio(300, total, 0.3, 0.5) == pytest.approx(0.5)
    assert ss_ratio(999, total, 0.3, 0.5) == pytest.approx(0.5)
    assert ss_ratio(100, total, peak_fraction=0.1, max_ratio=0.2) == pytest.approx(0.2)
    assert ss_ratio(0, total, 0.0, 0.4) == 0.4  # no ramp: the final ratio from the start
    ramp = [ss_ratio(s, total, 0.3, 0.5) for s in range(301)]
    assert all(b >= a for a, b in zip(ramp, ramp[1:]))


def test_disc_step_every_k_from_start():
    due = [s for s in range(20) if disc_step_due(s, 5)]
    assert due == [0, 5, 10, 15]
    assert [s for s in range(20) if disc_step_due(s, 5, start=7)] == [7, 12, 17]
    assert not any(disc_step_due(s, 0) for s in range(10))
