"""The vectorized per-step RDP of the subsampled Gaussian (accountants.sgm_rdp): against
dp_accounting's series on a grid, against 40-digit arithmetic, its tail identity, its
convergence handling and its speed."""

from __future__ import annotations

import itertools
import logging
import math
import time

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp

from accountants import ADAPTIVE_ORDERS, RDP_ORDERS, sgm_rdp
from accountants.sgm_rdp import LOG_A_SLACK_ABS, MAX_TERMS, subsampled_gaussian_rdp

mp = pytest.importorskip("mpmath")
EPS = np.finfo(np.float64).eps


def dp_curve(q: float, sigma: float, orders=RDP_ORDERS) -> np.ndarray:
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.ERROR)  # its "failed to converge" warnings
    try:
        return np.asarray(dp_rdp._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders))
    finally:
        logger.setLevel(previous)


def check_against_dp(ours: np.ndarray, ref: np.ndarray, orders) -> int:
    """Same inf pattern; finite values equal within 1e-10 relative or larger.  Below dp only by
    dp's own rounding: its log-space sums of ~n terms near 1 carry ~n eps in log A.  Above by
    at most dp's early truncation (its rule stops while the tail is up to ~1e-5 of the RDP on
    this grid) and the round-up.
    Returns how many finite orders agree within 1e-10 (and that rounding)."""
    a = np.asarray(orders)
    assert np.array_equal(np.isinf(ours), np.isinf(ref)), (ours, ref)
    fin = np.isfinite(ref)
    a, ours, ref = a[fin], ours[fin], ref[fin]
    n = np.where(a == np.round(a), a + 1, MAX_TERMS)
    rounding = 4 * n * EPS * np.maximum(1.0, ref * (a - 1)) / (a - 1)
    assert np.all(ours >= ref - 1e-10 * ref - rounding), (a, ours, ref)
    slack = rounding + 2 * LOG_A_SLACK_ABS / (a - 1)
    assert np.all(ours <= ref * (1 + 1e-5) + slack)
    return int(np.sum(np.abs(ours - ref) <= 1e-10 * ref + slack))


QS = (1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9, 1.0)
SIGMAS = (0.3, 0.7, 1.5, 5.0, 50.0)


@pytest.mark.slow
@pytest.mark.parametrize("q", QS)
def test_matches_dp_accounting_on_grid(q: float) -> None:
    """q in [1e-4, 1] x sigma in [0.3, 50], every order of both grids (ADAPTIVE_ORDERS is a
    subset of RDP_ORDERS: one dp_accounting curve serves both)."""
    pick = [RDP_ORDERS.index(a) for a in ADAPTIVE_ORDERS]
    agree = total = 0
    for sigma in SIGMAS:
        ref = dp_curve(q, sigma)
        agree += check_against_dp(subsampled_gaussian_rdp(q, sigma, RDP_ORDERS), ref, RDP_ORDERS)
        adaptive = subsampled_gaussian_rdp(q, sigma, ADAPTIVE_ORDERS)
        check_against_dp(adaptive, ref[pick], ADAPTIVE_ORDERS)
        total += int(np.isfinite(ref).sum())
    assert agree >= 0.85 * total  # most orders to 1e-10; the rest above (dp truncates early)


def exact_log_a(
    q: float, sigma: float, alpha: float, terms: int = MAX_TERMS
) -> tuple[float, float]:
    """log A in 40 digits: the binomial sum (integer alpha) or the |C| series of fractional
    alpha summed over up to ``terms`` terms, as (partial sum, partial sum + tail bound)."""
    with mp.workdps(40):
        q, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)
        if alpha == int(alpha):
            total = mp.fsum(
                mp.binomial(a, i) * q**i * (1 - q) ** (a - i) * mp.exp((i * i - i) / (2 * s * s))
                for i in range(int(alpha) + 1)
            )
            return float(mp.log(total)), float(mp.log(total))
        z0 = s * s * mp.log(1 / q - 1) + mp.mpf(1) / 2
        tail_q = lambda x: mp.erfc(x / mp.sqrt(2)) / 2  # noqa: E731
        total = mp.mpf(0)
        for i in range(terms):
            c, j = abs(mp.binomial(a, i)), a - i
            t0 = c * q**i * (1 - q) ** j * mp.exp((i * i - i) / (2 * s * s)) * tail_q((i - z0) / s)
            t1 = c * q**j * (1 - q) ** i * mp.exp((j * j - j) / (2 * s * s)) * tail_q((z0 - j) / s)
            total += t0 + t1
            bound = (t0 + t1) / c * abs(mp.binomial(a - 1, i))
            if i > alpha and bound < total * mp.mpf(10) ** -30:
                break
        return float(mp.log(total)), float(mp.log(total + bound))


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [
        (1e-4, 50.0, 2.0),  # A - 1 ~ 4e-12: dp_accounting's log-space sum is off by 1e-9
        (1e-4, 50.0, 768.0),
        (0.01, 1.0, 32.0),
        (0.5, 1.0, 1024.0),
        (1e-4, 50.0, 1.05),  # fractional, A - 1 ~ 1e-13
        (0.01, 1.0, 1.5),  # slowly converging tail: dp_accounting stops 1e-7 of A early
        (0.1, 2.0, 5.5),
        (1e-4, 0.3, 31.5),
        (0.99, 1.0, 3.3),
    ],
)
def test_upper_bound_of_the_exact_value(q: float, sigma: float, alpha: float) -> None:
    """Never below the exact series (40 digits: at least its partial sum ``lo``, and its
    upper bound ``hi`` to rounding, as both stop at the same term), and within 1e-9 of
    ``hi`` plus the round-up."""
    lo, hi = exact_log_a(q, sigma, alpha)
    ours = subsampled_gaussian_rdp(q, sigma, [alpha])[0] * (alpha - 1)
    assert ours >= lo
    assert ours >= hi * (1 - 1e-12)
    assert ours <= hi * (1 + 1e-9) + 2 * LOG_A_SLACK_ABS


@pytest.mark.parametrize("alpha", [1.05, 1.5, 2.5, 7.3, 31.5])
def test_alternating_binomial_identity_behind_the_tail_bound(alpha: float) -> None:
    """sum_{i<=n} (-1)^i C(a, i) = (-1)^n C(a - 1, n), so that for n >= floor(a) (where the
    signs of (-1)^i C(a, i) agree) sum_{i>n} |C(a, i)| = |C(a - 1, n)|."""
    with mp.workdps(30):
        a = mp.mpf(alpha)
        partial = mp.mpf(0)
        for n in range(60):
            partial += (-1) ** n * mp.binomial(a, n)
            assert mp.almosteq(partial, (-1) ** n * mp.binomial(a - 1, n), 1e-25)
        signs = {mp.sign((-1) ** i * mp.binomial(a, i)) for i in range(int(alpha) + 1, 200)}
        assert len(signs) == 1


def test_terms_over_binomial_do_not_increase() -> None:
    """(s0_i + s1_i) / |C(a, i)| is non-increasing in i (what the tail bound rests on)."""
    for q, sigma in itertools.product((1e-3, 0.1, 0.5, 0.95), (0.3, 1.0, 5.0)):
        a = np.array([1.05, 2.5, 11.9, 31.5])
        s0, s1, log_c = sgm_rdp._fractional_terms(q, sigma, a, np.arange(600.0))
        w = np.logaddexp(s0, s1) - log_c
        assert np.all(np.diff(w, axis=1) <= 1e-9 * (1 + np.abs(w[:, 1:]))), (q, sigma)


def test_near_ties_of_the_rule_are_decided_by_dp_accounting(monkeypatch) -> None:
    """With every comparison treated as a near-tie, each fractional order is recomputed by
    dp_accounting and the larger value kept: still never below it, same inf pattern."""
    monkeypatch.setattr(sgm_rdp, "_RULE_TOL", math.inf)
    for q, sigma in ((0.01, 1.0), (0.5, 1.0)):
        ref = dp_curve(q, sigma, ADAPTIVE_ORDERS)
        check_against_dp(subsampled_gaussian_rdp(q, sigma, ADAPTIVE_ORDERS), ref, ADAPTIVE_ORDERS)


def test_edge_cases_and_errors() -> None:
    orders = (1.5, 2.0, 64.0)
    assert np.array_equal(subsampled_gaussian_rdp(0.0, 0.0, orders), np.zeros(3))
    assert np.all(np.isinf(subsampled_gaussian_rdp(0.1, 0.0, orders)))
    assert np.array_equal(subsampled_gaussian_rdp(0.1, math.inf, orders), np.zeros(3))
    assert np.allclose(subsampled_gaussian_rdp(1.0, 2.0, orders), np.array(orders) / 8.0)
    for bad in ((-0.1, 1.0, orders), (1.5, 1.0, orders), (0.1, -1.0, orders)):
        with pytest.raises(ValueError):
            subsampled_gaussian_rdp(*bad)
    with pytest.raises(ValueError, match="orders"):
        subsampled_gaussian_rdp(0.1, 1.0, (1.0, 2.0))
    # a fractional order above the first block of terms still gets n >= floor(alpha)
    big = subsampled_gaussian_rdp(0.01, 3.0, (100.5,))
    check_against_dp(big, dp_curve(0.01, 3.0, (100.5,)), (100.5,))


def test_a_new_sigma_is_much_faster_than_dp_accounting() -> None:
    """Interleaved, so that a loaded machine slows both: at least 5x dp_accounting (about
    20x on a quiet machine at the 206 orders)."""
    ours, ref = [], []
    for k in range(3):
        sigma = 1.2345 + 1e-7 * k
        t0 = time.perf_counter()
        subsampled_gaussian_rdp(0.01, sigma, RDP_ORDERS)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dp_curve(0.01, sigma, RDP_ORDERS)
        ref.append(time.perf_counter() - t0)
    assert min(ours) * 5 < min(ref), (ours, ref)
