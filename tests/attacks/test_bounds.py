"""Empirical-epsilon bounds: Clopper-Pearson, Jagielski et al., and the one-run bound of
Steinke, Nasr, Jagielski (2023) against mechanisms of known epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from attacks.bounds import (
    clopper_pearson,
    epsilon_from_rates,
    gaussian_epsilon,
    guess_plans,
    one_run_audit,
    one_run_epsilon,
    one_run_epsilon_best,
    one_run_p_value,
)


def p_value_loop(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al. 2023, Algorithm 2, term by term with scipy's binomial."""
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = stats.binom.sf(v - 1, r, q)
    best, window = 0.0, 0.0
    for i in range(1, v + 1):
        window += stats.binom.pmf(v - i, r, q)
        best = max(best, window / i)
    return min(tail + 2 * m * delta * best, 1.0)


@pytest.mark.parametrize(
    "m,r,v,eps,delta",
    [(1000, 600, 600, 2.0, 1e-5), (1000, 600, 500, 1.0, 1e-5), (100, 50, 30, 0.3, 1e-3),
     (10, 10, 0, 0.5, 0.0), (1000, 100, 95, 3.0, 1e-6), (64, 64, 64, 8.0, 1e-2)],
)  # fmt: skip
def test_p_value_matches_the_papers_algorithm(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        p_value_loop(m, r, v, eps, delta), rel=1e-7, abs=1e-12
    )


def test_one_run_epsilon_is_the_largest_rejected_epsilon():
    m, r, delta, beta = 500, 200, 1e-5, 0.05
    v = np.arange(0, r + 1, 10)
    eps = one_run_epsilon(m, r, v, delta, 1 - beta)
    assert np.all(np.diff(eps) >= 0)  # more right guesses, larger bound
    assert eps[0] == 0 and eps[-1] > 3
    for vi, e in zip(v, eps, strict=True):
        if e > 0:
            assert p_value_loop(m, r, int(vi), e * 0.999, delta) < beta
        assert p_value_loop(m, r, int(vi), e + 1e-6, delta) >= beta - 1e-9


def test_clopper_pearson_coverage_and_edges():
    n, p, alpha = 40, 0.3, 0.05
    k = np.random.default_rng(0).binomial(n, p, 4000)
    bounds = np.array([clopper_pearson(int(x), n, alpha) for x in range(n + 1)])
    assert np.mean(bounds[k, 0] > p) <= alpha  # lower bound above the truth: rare
    assert np.mean(bounds[k, 1] < p) <= alpha
    assert clopper_pearson(0, n, alpha)[0] == 0.0
    assert clopper_pearson(0, n, alpha)[1] == pytest.approx(1 - alpha ** (1 / n))
    assert clopper_pearson(n, n, alpha) == (pytest.approx(alpha ** (1 / n)), 1.0)
    assert np.all(np.diff(bounds[:, 0]) > 0) and np.all(np.diff(bounds[:, 1]) > 0)
    with pytest.raises(ValueError):
        clopper_pearson(5, 4, alpha)


def test_epsilon_from_rates():
    # a perfect attack on n + n records: log of the Clopper-Pearson ratio, growing with n
    e100 = epsilon_from_rates(100, 100, 0, 100, 1e-5, 0.95)
    e1000 = epsilon_from_rates(1000, 1000, 0, 1000, 1e-5, 0.95)
    alpha = 0.025
    assert e100 == pytest.approx(math.log((alpha ** (1 / 100) - 1e-5) / (1 - alpha ** (1 / 100))))
    assert 0 < e100 < e1000
    assert epsilon_from_rates(50, 100, 50, 100, 1e-5, 0.95) == 0.0  # guessing shows nothing
    # soundness on a simulated eps-DP randomized response: TPR = q, FPR = 1 - q
    eps, n = 1.0, 200
    q = math.exp(eps) / (1 + math.exp(eps))
    rng = np.random.default_rng(1)
    tp, fp = rng.binomial(n, q, 1000), rng.binomial(n, 1 - q, 1000)
    lb = np.array(
        [epsilon_from_rates(int(a), n, int(b), n, 0.0, 0.95) for a, b in zip(tp, fp, strict=True)]
    )
    assert np.mean(lb > eps) <= 0.05
    assert np.median(lb) > 0.3


def test_one_run_bound_is_valid_and_nearly_tight_for_randomized_response():
    """eps-DP randomized response per canary: the right-guess count is exactly
    Binomial(m, e^eps / (1 + e^eps)), the extreme case of the theorem, so the bound must exceed
    eps in at most a beta fraction of trials -- and not far fewer (a loose implementation
    would never exceed it)."""
    m, eps, beta, trials = 400, 1.0, 0.05, 20000
    q = math.exp(eps) / (1 + math.exp(eps))
    v = np.random.default_rng(2).binomial(m, q, trials)
    table = one_run_epsilon(m, m, np.arange(m + 1), 0.0, 1 - beta)
    over = np.mean(table[v] > eps)
    assert over <= beta + 3 * math.sqrt(beta * (1 - beta) / trials)
    assert over > beta / 3


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_one_run_bound_never_exceeds_a_gaussian_mechanisms_epsilon(mu):
    """Simulated Gaussian mechanism: canary i is included with probability 1/2 and the
    auditor sees y_i = mu * [included] + N(0, 1), a mu-GDP release per canary.  Over many
    trials the bound (best of the guess plans, Bonferroni-corrected) stays below the exact
    epsilon at the stated confidence; the ratio is recorded in benchmarks/README.md."""
    m, delta, confidence, trials = 256, 1e-5, 0.95, 3000
    rng = np.random.default_rng(3)
    included = rng.random((trials, m)) < 0.5
    y = mu * included + rng.standard_normal((trials, m))
    res = one_run_audit(y, included, delta, confidence)
    true = gaussian_epsilon(mu, delta)
    assert np.mean(res["epsilon"] > true) <= 1 - confidence
    assert res["epsilon"].max() <= true
    assert np.median(res["epsilon"]) > 0  # it does detect the leakage


def test_gaussian_epsilon_matches_the_pld_accountant():
    from accountants import Event, get_accountant

    # one unsampled Gaussian step with noise multiplier sigma is (1 / sigma)-GDP
    for sigma in (0.8, 2.0):
        pld = get_accountant("pld").epsilon([Event(1.0, sigma, 1)], 1e-5)
        assert gaussian_epsilon(1 / sigma, 1e-5) == pytest.approx(pld, rel=2e-3)


def test_one_run_best_and_plans():
    plans = guess_plans(128)
    assert (128, 0) not in plans and (64, 64) in plans and (8, 0) in plans
    assert all(a + b <= 128 for a, b in plans)
    scores = np.arange(128.0)
    included = scores >= 64  # a perfect attack
    best = one_run_epsilon_best(scores, included, 1e-6, 0.95)
    assert best["correct"] == best["guesses"] == 128
    assert best["epsilon"] == pytest.approx(best["ceiling"])
    blind = one_run_epsilon_best(np.zeros(128), included, 1e-6, 0.95)
    assert blind["epsilon"] < best["epsilon"]
