import math

import pytest

from provq_lightning.schedules import (
    Phase,
    alpha_at,
    cosine_alpha,
    exponential_alpha,
    hard_alpha,
    linear_alpha,
    omega,
    phase_at,
)


def test_cosine_matches_paper_equation():
    T = 200
    for t in (0, 1, 50, 100, 150, 199):
        assert cosine_alpha(t, T) == pytest.approx(0.5 * (1 + math.cos(math.pi * t / T)))
    assert cosine_alpha(0, T) == 1.0
    assert cosine_alpha(100, T) == pytest.approx(0.5)
    assert cosine_alpha(T, T) == 0.0 and cosine_alpha(T + 5, T) == 0.0


def test_other_ramps():
    T = 100
    assert linear_alpha(25, T) == pytest.approx(0.75)
    assert exponential_alpha(0, T) == 1.0
    assert exponential_alpha(50, T) == pytest.approx(math.exp(-2.5))
    assert [hard_alpha(t, T) for t in (0, 99, 100)] == [1.0, 1.0, 0.0]
    for fn in (cosine_alpha, linear_alpha, exponential_alpha):
        values = [fn(t, T) for t in range(T + 1)]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False)), fn.__name__


def test_phases_and_alpha_over_a_whole_run():
    warm, trans = 10, 20
    assert [phase_at(s, warm, trans) for s in (0, 9, 10, 29, 30, 1000)] == [
        Phase.WARMUP,
        Phase.WARMUP,
        Phase.TRANSITION,
        Phase.TRANSITION,
        Phase.DISCRETE,
        Phase.DISCRETE,
    ]
    assert alpha_at(0, warm, trans) == 1.0  # warmup: fully continuous
    assert alpha_at(10, warm, trans) == 1.0  # transition starts at alpha 1
    assert alpha_at(20, warm, trans) == pytest.approx(0.5)
    assert alpha_at(30, warm, trans) == 0.0
    # Vanilla: no warmup, no transition: hard from step 0.
    assert phase_at(0, 0, 0) is Phase.DISCRETE and alpha_at(0, 0, 0) == 0.0
    # Hard ramp: continuous decoder input through the transition, then a switch.
    assert alpha_at(29, warm, trans, "hard") == 1.0 and alpha_at(30, warm, trans, "hard") == 0.0


def test_omega():
    assert omega(1.0, 0.5) == 0.5
    assert omega(0.0, 0.5) == 1.0
    assert omega(0.5, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert omega(1.0, 1.0) == 1.0  # lam 1: full VQ weight throughout (the protein setting)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="sigmoid.*cosine, linear, exponential, hard"):
        alpha_at(5, 0, 10, "sigmoid")
