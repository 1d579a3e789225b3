"""Noise calibration: the returned sigma meets the target and is the smallest within tol."""

from __future__ import annotations

import math

import pytest

from accountants import (
    EpsilonUnreachableError,
    Event,
    calibrate_noise,
    calibrate_steps,
    get_accountant,
)
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


# -- what limits an unreachable target ---------------------------------------------------------


def test_rdp_floor_is_the_conversion_limit_at_delta() -> None:
    from accountants.rdp import RDP_ORDERS, conversion_floor, delta_for_floor

    floor, order = conversion_floor(RDP_ORDERS, DELTA)
    assert order == 1024.0 and 0.0035 < floor < 0.00351  # log1p(-1/a) - log(delta a) / (a - 1)
    huge = get_accountant("rdp").epsilon([Event(1.0, 1e6, 1000)], DELTA)
    assert floor <= huge < floor * 1.001  # no noise goes below it
    need = delta_for_floor(RDP_ORDERS, 0.003)
    assert (
        conversion_floor(RDP_ORDERS, need * 1.01)[0]
        <= 0.003
        < conversion_floor(RDP_ORDERS, need * 0.99)[0]
    )


def test_unreachable_rdp_target_names_the_order_floor_and_the_fix() -> None:
    with pytest.raises(EpsilonUnreachableError) as below:
        calibrate_noise(0.003, DELTA, 1.0, 1000, "rdp")
    msg = str(below.value)
    assert "certifies no epsilon below 0.003501" in msg and "order 1024, the largest" in msg
    assert "'pld' or 'prv'" in msg and "delta well above 1.7e-05" in msg
    assert "1e+06" in msg  # the search limit is still named, but not as the reason
    with pytest.raises(EpsilonUnreachableError, match="so close to it") as near:
        calibrate_noise(0.003503, DELTA, 1.0, 10_000, "rdp")  # needs sigma > 1e6
    assert "fewer steps" in str(near.value)


def test_near_the_rdp_floor_the_secant_does_not_overflow() -> None:
    # eps(sigma) is nearly flat there, then drops to 0 (KL shortcut): once an OverflowError
    sigma = calibrate_noise(0.003, DELTA, 0.01, 1000, "rdp")
    assert get_accountant("rdp").epsilon([Event(0.01, sigma, 1000)], DELTA) <= 0.003


def test_pld_calibrates_below_the_rdp_floor() -> None:
    # the RDP start hint is unreachable here; PLD itself is not limited
    sigma = calibrate_noise(0.003, DELTA, 1.0, 10, "pld")
    eps = get_accountant("pld").epsilon([Event(1.0, sigma, 10)], DELTA)
    assert 0.003 * 0.99 < eps <= 0.003


# -- brute force: calibrated sigma against a scan of neighbouring sigmas -------------------------


@pytest.mark.parametrize(
    ("name", "target", "q", "steps"),
    [
        ("pld", 0.003, 1.0, 10),  # below RDP's floor
        ("pld", 0.5, 0.05, 2000),
        ("pld", 4.0, 0.2, 50),
        ("pld", 1.0, 0.01, 300),
        ("prv", 0.5, 1.0, 5),
        ("prv", 3.0, 1.0, 50),
    ],
)
def test_calibrated_sigma_is_never_above_target_and_tight(name, target, q, steps) -> None:
    """Scan sigma * (1 + k tol), k in {-2, -1, 0, 2}, with a fresh accountant: the calibrated
    sigma and above meet the target (never a sigma whose epsilon exceeds it), those below miss
    it, and the achieved epsilon is within 1% of the target.  (PRV points use q = 1: each new
    subsampled sigma costs PRV seconds; test_smallest_sigma_meeting_target has q = 0.05.)"""
    tol = 1e-3
    sigma = calibrate_noise(target, DELTA, q, steps, name, tol=tol)
    acc = get_accountant(name)
    scan = {k: acc.epsilon([Event(q, sigma * (1 + k * tol), steps)], DELTA) for k in (-2, -1, 0, 2)}
    assert scan[0] <= target and scan[2] <= target, scan
    assert scan[-1] > target and scan[-2] > target, scan
    assert scan[0] >= target * 0.99


# -- progress notices --------------------------------------------------------------------------


def test_a_fast_pld_query_prints_nothing(capsys) -> None:
    get_accountant("pld").epsilon([Event(0.01, 1.0, 1000)], DELTA)
    assert capsys.readouterr().err == ""


def test_a_slow_pld_query_announces_its_size_and_time(capsys, monkeypatch) -> None:
    """With the threshold at 0 every query counts as slow: the notice names the exact number
    of loss bins dp_accounting then builds, and a second line reports the time taken."""
    from accountants import progress
    from accountants.pld import PldAccountant

    monkeypatch.setattr(progress, "SLOW_SECONDS", 0.0)
    acc = PldAccountant()
    acc.epsilon([Event(0.01, 1.0, 1000)], DELTA)
    ((one, _),) = acc._singles.values()
    bins = max(one._pmf_remove.size, one._pmf_add.size)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"pld accountant: discretizing q=0.01 sigma=1 on {bins:,} loss")
    assert "expected ~" in lines[0] and "done in" in lines[1]
    assert any("composing 1,000 steps" in line for line in lines)


def test_rough_loss_bins_bound_the_exact_count() -> None:
    from accountants.pld import PldAccountant, loss_bins, rough_loss_bins

    for q, sigma in [(1e-6, 0.3), (1e-3, 0.6), (0.01, 1.0), (1.0, 5.0), (0.5, 0.2)]:
        h = PldAccountant().interval_for([("poisson_gaussian", q, sigma)])
        exact = loss_bins(q, sigma, h)
        assert exact <= rough_loss_bins(q, sigma, h) <= 5 * exact
