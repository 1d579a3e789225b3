"""PRV and PLD accountants against a fine pessimistic PLD and the PRV library's lower bound.

Grid (conftest.GRID): q in {1e-3, 0.01, 0.05, 0.1, 0.2, 1}, sigma in [0.5, 10], 1..10^4 steps,
two heterogeneous schedules; epsilon between 0.17 and 10 at delta = 1e-5.  Points with tiny
epsilon (< 0.05) are left out: there the PRV bound is valid but looser than 1% (its error is
additive, see accountants.prv).
"""

from __future__ import annotations

import math
import warnings

import pytest

import accountants.prv as prv_module
from accountants import Event, PldAccountant, PrvAccountant, PrvFallbackWarning

from .conftest import DELTA, GRID, events_of, fine_pld_epsilon, prv_bounds

IDS = ["+".join(f"q{q:g}s{s:g}n{n}" for q, s, n in spec) for spec in GRID]


@pytest.mark.parametrize("spec", GRID, ids=IDS)
def test_prv_upper_bound_close_to_fine_pld(spec) -> None:
    lower, upper = prv_bounds(spec)
    reference = fine_pld_epsilon(spec)
    assert lower <= reference <= upper * 1.0001  # both bound the same true epsilon
    assert abs(upper - reference) <= 0.01 * reference, (upper, reference)
    assert upper >= lower


@pytest.mark.parametrize("spec", GRID, ids=IDS)
def test_pld_close_to_fine_pld(spec) -> None:
    eps = PldAccountant().epsilon(events_of(spec), DELTA)
    reference = fine_pld_epsilon(spec)
    lower, _ = prv_bounds(spec)
    assert eps >= lower
    assert abs(eps - reference) <= 0.01 * reference, (eps, reference)


def test_prv_reports_upper_bound_not_estimate(prv: PrvAccountant) -> None:
    spec = GRID[4]
    lower, upper = prv_bounds(spec)
    assert prv.epsilon(events_of(spec), DELTA) == upper > lower


def test_prv_delta_is_an_upper_bound(prv: PrvAccountant) -> None:
    events = events_of(GRID[4])
    eps = fine_pld_epsilon(GRID[4])
    d_prv = prv.delta(events, eps)
    d_pld = PldAccountant().delta(events, eps)
    assert d_pld <= DELTA * 1.001
    assert d_prv >= d_pld * 0.99  # not below the (pessimistic) PLD by more than its slack
    assert d_prv <= DELTA * 1.5


def test_prv_full_batch_uses_gaussian(prv: PrvAccountant) -> None:
    # q == 1 is the plain Gaussian mechanism: compare with the analytic Gaussian curve
    from dp_accounting.pld import privacy_loss_distribution as pld

    exact = pld.from_gaussian_mechanism(
        10.0 / math.sqrt(4), value_discretization_interval=1e-5
    ).get_epsilon_for_delta(DELTA)
    upper = prv.epsilon([Event(1.0, 10.0, 4)], DELTA)
    assert exact <= upper <= exact * 1.01


def test_prv_and_pld_edge_cases(prv: PrvAccountant) -> None:
    pld = PldAccountant()
    for acc in (prv, pld):
        assert acc.epsilon([], DELTA) == 0.0
        assert acc.epsilon([Event(0.1, math.inf, 100)], DELTA) == 0.0
        assert acc.epsilon([Event(0.1, 0.0, 1), Event(0.1, 1.0, 1)], DELTA) == math.inf
        assert acc.delta([Event(0.1, 0.0, 1)], 1.0) == 1.0


def test_prv_falls_back_to_pld_when_the_library_fails(prv, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("Floating point errors will dominate for such small values of delta.")

    monkeypatch.setattr(prv_module, "PRVAccountant", broken)
    events = [Event(0.05, 1.3, 7)]  # not in the grid cache
    with pytest.warns(PrvFallbackWarning, match="Floating point errors"):
        eps = prv.epsilon(events, DELTA)
    assert eps == PldAccountant().epsilon(events, DELTA)
    with pytest.warns(PrvFallbackWarning):
        assert prv.delta(events, 1.0) == PldAccountant().delta(events, 1.0)


def test_prv_extreme_parameters_never_under_report() -> None:
    acc = PrvAccountant(max_grid_points=2**18)
    # tiny noise at a high rate: the library rejects its own discretization -> PLD fallback
    with pytest.warns(PrvFallbackWarning, match="Discrete mean differs"):
        eps = acc.epsilon([Event(0.5, 0.1, 10)], DELTA)
    assert eps > 500  # the pessimistic PLD (565.6)
    # huge noise: epsilon ~ 0, and the bound stays above the pessimistic PLD
    events = [Event(0.01, 1000.0, 10)]
    assert acc.epsilon(events, DELTA) >= PldAccountant().epsilon(events, DELTA) >= 0.0


def test_prv_huge_step_counts_stay_upper_bounds() -> None:
    # A coarse grid (eps_err raised to fit it) and 3e6 steps: without re-centring the
    # discretized PRV on an accurate mean, prv-accountant 0.2.0 returns an "upper bound" of
    # ~148 here (2^18 nodes) for a true epsilon of ~347.
    acc = PrvAccountant(max_grid_points=2**18)
    events = [Event(0.01, 1.0, 3_000_000)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrvFallbackWarning)  # the PRV result itself is sound
        upper = acc.epsilon(events, DELTA)
    reference = PldAccountant().epsilon(events, DELTA)
    assert reference <= upper <= reference * 1.1


def test_prv_guard_catches_bounds_below_the_pld(monkeypatch) -> None:
    # a grid so coarse that the library's output is garbage: the PLD cross-check catches it
    acc = PrvAccountant(max_grid_points=2**16)
    events = [Event(0.01, 1.0, 1_000_000)]
    with pytest.warns(PrvFallbackWarning, match="below the pessimistic PLD"):
        eps = acc.epsilon(events, DELTA)
    assert eps == PldAccountant().epsilon(events, DELTA)


def _gaussian_epsilon(delta: float, s: float) -> float:
    """Exact epsilon of the Gaussian mechanism (sensitivity 1, std ``s``) at ``delta``
    (Balle & Wang 2018), by bisection on its closed-form delta in log space."""
    from scipy.optimize import brentq
    from scipy.special import log_ndtr

    def d(eps: float) -> float:
        la, lb = log_ndtr(1 / (2 * s) - eps * s), log_ndtr(-1 / (2 * s) - eps * s)
        return math.exp(la) * -math.expm1(min(0.0, eps + lb - la)) - delta

    hi = 1.0
    while d(hi) > 0:
        hi *= 2
    return brentq(d, 0.0, hi, xtol=1e-12)


@pytest.mark.parametrize("delta", [1e-12, 1e-10])
def test_pld_never_below_the_exact_gaussian_at_tiny_delta(delta):
    """1000 full-batch steps of sigma 5 are one Gaussian of std 5 / sqrt(1000): the PLD bound
    is at least its exact epsilon, or the delta is refused as below the FFT floor (before the
    floor it reported 63.8161 < 63.8187 at delta 1e-12)."""
    from accountants.pld import DeltaBelowFloorError

    events = [Event(1.0, 5.0, 1000)]
    exact = _gaussian_epsilon(delta, 5.0 / math.sqrt(1000))
    try:
        assert PldAccountant().epsilon(events, delta) >= exact
    except DeltaBelowFloorError:
        assert delta < 1e-10
    assert PldAccountant().delta(events, exact) >= delta


def test_prv_prints_no_library_overflow_warning() -> None:
    """A small sigma (as `dptrain calibrate --accountant prv` probes) overflows exp(t) in
    prv-accountant's cdf (harmless: the cdf is then 1); the user sees no RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        eps = PrvAccountant().epsilon([Event(0.01, 0.15, 1000)], 1e-5)
    assert 470 < eps < 480
