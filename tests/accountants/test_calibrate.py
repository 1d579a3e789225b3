"""Noise calibration: the returned sigma meets the target and is the smallest within tol."""

from __future__ import annotations

import math

import pytest

from accountants import Event, calibrate_noise, calibrate_steps, get_accountant
from accountants.calibrate import smallest_sigma

DELTA = 1e-5


@pytest.mark.parametrize(
    ("name", "target", "q", "steps", "tol"),
    [
        ("rdp", 8.0, 0.01, 1000, 1e-3),
        ("rdp", 0.5, 0.001, 10_000, 1e-3),
        ("rdp", 3.0, 1.0, 10, 1e-3),
        ("pld", 1.0, 0.01, 1000, 1e-3),
        ("pld", 8.0, 0.1, 100, 1e-3),
        ("prv", 2.0, 0.05, 100, 1e-3),
    ],
)
def test_smallest_sigma_meeting_target(name, target, q, steps, tol) -> None:
    sigma = calibrate_noise(target, DELTA, q, steps, name, tol=tol)
    acc = get_accountant(name)
    achieved = acc.epsilon([Event(q, sigma, steps)], DELTA)
    assert achieved <= target  # rounded up: the target holds
    assert acc.epsilon([Event(q, sigma * (1 - tol), steps)], DELTA) > target  # smallest
    assert achieved > target * 0.98  # round trip: epsilon(calibrate(target)) ~ target


def test_smallest_sigma_on_a_known_curve() -> None:
    # eps(sigma) = 4 / sigma: the answer is 2 for target 2
    calls: list[float] = []

    def eps(sigma: float) -> float:
        calls.append(sigma)
        return 4.0 / sigma

    sigma = smallest_sigma(eps, 2.0, tol=1e-6)
    assert 2.0 <= sigma <= 2.0 * (1 + 1e-6)
    assert len(calls) < 25


def test_calibration_errors() -> None:
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise(0.0, DELTA, 0.01, 100)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(1.0, DELTA, 0.0, 100)
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise(1.0, DELTA, 0.01, 0)
    with pytest.raises(ValueError, match="delta"):
        calibrate_noise(1.0, 2.0, 0.01, 100)
    with pytest.raises(ValueError, match="unknown accountant"):
        calibrate_noise(1.0, DELTA, 0.01, 100, "moments")


def test_calibrate_steps_round_trip() -> None:
    n = calibrate_steps(2.0, DELTA, 0.01, 1.0)
    acc = get_accountant("rdp")
    assert acc.epsilon([Event(0.01, 1.0, n)], DELTA) <= 2.0
    assert acc.epsilon([Event(0.01, 1.0, n + 1)], DELTA) > 2.0
    assert calibrate_steps(2.0, DELTA, 0.01, math.inf) > 10**18
