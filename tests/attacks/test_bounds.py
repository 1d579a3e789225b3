"""Empirical-epsilon bounds: Clopper-Pearson, Jagielski et al., the one-run bound of
Steinke, Nasr, Jagielski (2023) and the f-DP one-run bound of Mahloujifar et al. (2024)
against mechanisms of known epsilon."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from attacks.bounds import (
    ceilings,
    clopper_pearson,
    epsilon_from_rates,
    fdp_audit,
    fdp_gaussian_mu,
    fdp_rejects,
    gaussian_epsilon,
    gaussian_tradeoff,
    guess_plans,
    ledger_tradeoff,
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


# -- f-DP in one run (Mahloujifar et al. 2024) ------------------------------------------------


def identity(x):
    return x


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_fdp_perfect_privacy_all_right_has_p_value_two_to_the_minus_m(m):
    """By hand: with g(x) = x (perfect privacy, each guess a fair coin) and all m guesses
    right, the recursion gives r + h = 2^m beta, so it rejects exactly when beta > 2^-m,
    the probability of guessing m fair coins."""
    p = 2.0**-m
    assert fdp_rejects(m, m, m, identity, min(p * 1.01, 0.99))
    assert not fdp_rejects(m, m, m, identity, p * 0.99)


def test_fdp_rejection_is_monotone_and_vectorized():
    m, k = 500, 200
    v = np.arange(0, k + 1, 10)
    mu = fdp_gaussian_mu(m, k, v, 0.95)
    assert np.all(np.diff(mu) >= -1e-9) and mu[0] == 0 and mu[-1] > 1  # more right, larger
    # entry by entry, and per-entry curves, give the same answers as one batch
    for vi, mi in zip(v[::5], mu[::5], strict=True):
        assert fdp_gaussian_mu(m, k, int(vi), 0.95)[0] == pytest.approx(mi, abs=1e-6)
    rej = fdp_rejects(m, k, v, gaussian_tradeoff(np.full(len(v), 0.8)), 0.05)
    assert rej.tolist() == [bool(x > 0.8) for x in mu]
    with pytest.raises(ValueError):
        fdp_rejects(10, 5, 6, identity, 0.05)


def test_ceilings_grow_with_canaries_and_shrink_with_confidence():
    c = {m: ceilings(m, 1e-5, 0.95) for m in (100, 1000, 10000)}
    for key in ("one_run", "fdp", "fdp_mu"):
        assert c[100][key] < c[1000][key] < c[10000][key]
    assert ceilings(1000, 1e-5, 0.99)["fdp"] < c[1000]["fdp"]
    assert all(c[m]["fdp"] > c[m]["one_run"] for m in c)  # the f-DP ceiling is higher
    # the ceiling is the bound of a perfect attack
    scores = np.arange(1000.0)
    best = fdp_audit(scores, scores >= 500, 1e-5, 0.95)
    assert best["epsilon"][0] == pytest.approx(c[1000]["fdp"], rel=1e-6)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_fdp_bound_never_exceeds_the_truth_and_beats_steinke(mu):
    """Exact mu-GDP mechanism per canary (y = mu [included] + N(0, 1), the optimal score):
    the f-DP bound on mu stays below mu (and so its epsilon below the truth) in all but a
    1 - confidence share of runs, and at equal m it certifies more than Steinke et al."""
    m, delta, trials = 512, 1e-5, 400
    rng = np.random.default_rng(11)
    included = rng.random((trials, m)) < 0.5
    y = mu * included + rng.standard_normal((trials, m))
    fdp = fdp_audit(y, included, delta, 0.95)
    steinke = one_run_audit(y, included, delta, 0.95)
    assert np.mean(fdp["mu"] > mu) <= 0.05
    assert np.mean(fdp["epsilon"] > gaussian_epsilon(mu, delta)) <= 0.05
    assert np.median(fdp["epsilon"]) > 1.2 * np.median(steinke["epsilon"])
    assert np.median(fdp["mu"]) > 0.3 * mu  # and it does detect the leakage


def test_ledger_curve_of_a_gaussian_ledger_is_the_gaussian_curve_from_below():
    """q = 1: two steps of noise 2 compose to the mu-GDP curve with mu = sqrt(2) / 2; the
    curve from the PLD profile must never be above it (above = claims more privacy than
    exists) and be close to it."""
    from accountants import Event

    g = ledger_tradeoff([Event(1.0, 2.0, 2)])
    x = np.concatenate([np.logspace(-9, -1, 200), np.linspace(0.1, 0.999, 200)])
    exact = gaussian_tradeoff(math.sqrt(2) / 2)(x)
    assert np.all(g(x) <= exact * (1 + 1e-9) + 1e-12)
    assert np.all(g(x) >= exact * 0.97 - 1e-4)


def test_the_claimed_subsampled_mechanism_is_rarely_rejected_against_its_own_curve():
    """Validity of the verdict's test: scores of the exact claimed mechanism (Poisson
    q = 0.5, 4 steps) reject the ledger's own curve in at most ~ 1 - confidence of runs."""
    from accountants import Event, get_accountant
    from attacks.whitebox import LedgerFamily, perfect_scores

    family = LedgerFamily([Event(0.5, 1.2, 4)], get_accountant("rdp"), 1e-5)
    scores, included = perfect_scores(np.random.default_rng(5), 100, 400, 4, 0.5, 1 / 1.2)
    assert np.mean(family.rejects(scores, included, 0, 0.95)) <= 0.05
    # a quarter of the noise (DP-SGD at sigma 0.3) is caught by the same test
    scores, included = perfect_scores(np.random.default_rng(6), 10, 400, 4, 0.5, 4 / 1.2)
    assert family.rejects(scores, included, 0, 0.95).all()


# -- the one-run bound against references that do not share its code ---------------------------


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_right_without_delta_matches_the_closed_form(r):
    """Closed form: with delta = 0 and all r guesses right the p-value is q^r, so the bound
    is the eps with q = beta^(1/r): eps = log(b / (1 - b)), b = beta^(1/r).  For r = 100 at
    95%: b = 0.05^0.01 = 0.97049 and eps = 3.4930."""
    beta = 0.05
    b = beta ** (1 / r)
    expected = math.log(b / (1 - b))
    assert one_run_epsilon(10 * r, r, r, 0.0, 1 - beta) == pytest.approx(expected, abs=1e-9)
    if r == 100:
        assert expected == pytest.approx(3.4930, abs=1e-4)


def test_p_value_matches_brute_force_enumeration_of_guess_outcomes():
    """Brute force on small numbers: enumerate all 2^r right/wrong patterns of r guesses, each
    right with probability q, and sum the p-value's two terms directly (no binomial code)."""
    m, r, delta = 20, 8, 1e-3
    patterns = np.array(list(itertools.product([0, 1], repeat=r)))
    right = patterns.sum(1)
    for eps in (0.0, 0.4, 1.3, 3.0):
        q = math.exp(eps) / (1 + math.exp(eps))
        weight = q**right * (1 - q) ** (r - right)
        for v in range(r + 1):
            tail = weight[right >= v].sum()
            window = max(
                (weight[(right >= v - i) & (right < v)].sum() / i for i in range(1, v + 1)),
                default=0.0,
            )
            brute = min(tail + 2 * m * delta * window, 1.0)
            assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(brute, abs=1e-12)


def test_bound_matches_a_brute_force_grid_search():
    """The bisection against a grid: the largest grid eps whose p-value (the paper's loop)
    is below beta, with every grid eps below it rejected too."""
    m, r, v, delta, beta = 200, 60, 50, 1e-4, 0.05

    def p_value(eps: float) -> float:  # scipy's binomial pmf, summed as in the theorem
        q = math.exp(eps) / (1 + math.exp(eps))
        pmf = stats.binom.pmf(np.arange(r + 1), r, q)
        window = np.cumsum(pmf[v - 1 :: -1]) / np.arange(1, v + 1)  # P[v-i <= B < v] / i
        return min(pmf[v:].sum() + 2 * m * delta * window.max(), 1.0)

    grid = np.arange(0, 6, 2e-3)
    rejected = np.array([p_value(e) < beta for e in grid])
    first_kept = int(np.argmin(rejected))  # rejected is a prefix of the grid here
    assert rejected[:first_kept].all() and not rejected[first_kept:].any()
    assert one_run_epsilon(m, r, v, delta, 1 - beta) == pytest.approx(grid[first_kept], abs=2e-3)


def test_bound_is_monotone_in_delta_and_confidence():
    m, r, v = 1000, 200, 170
    by_delta = [one_run_epsilon(m, r, v, d, 0.95) for d in (0.0, 1e-6, 1e-5, 1e-4)]
    assert all(a >= b for a, b in itertools.pairwise(by_delta))
    by_conf = [one_run_epsilon(m, r, v, 1e-5, c) for c in (0.8, 0.9, 0.95, 0.99)]
    assert all(a > b for a, b in itertools.pairwise(by_conf))


def test_tied_scores_do_not_let_the_array_order_guess():
    """All canaries scored alike, members listed first: the guesses must not follow the array
    order (a stable sort would guess every member right and report the ceiling)."""
    m = 200
    included = np.arange(m) < m // 2
    tied = one_run_epsilon_best(np.zeros(m), included, 1e-5, 0.95)
    assert tied["epsilon"] < 0.2 * tied["ceiling"]
    # over many independent coin vectors, tied scores are blind guessing: the bound is
    # positive in at most a 1 - confidence share of runs
    coins = np.random.default_rng(7).random((200, m)) < 0.5
    res = one_run_audit(np.zeros((200, m)), coins, 1e-5, 0.95)
    assert np.mean(res["epsilon"] > 0) <= 0.05
    # ties within a class change nothing: a perfect two-level score is still perfect
    perfect = one_run_epsilon_best(included * 1.0, included, 1e-5, 0.95)
    assert perfect["correct"] == perfect["guesses"]


def test_bound_inputs_are_refused_clearly():
    scores, bits = np.arange(8.0), np.arange(8) % 2 == 0
    for bad, match in [
        ((scores, np.r_[bits[:7], 2]), "0/1"),
        ((scores, bits * 0.5), "0/1"),
        ((scores[:7], bits), "one inclusion bit per score"),
        ((np.r_[scores[:7], np.nan], bits), "finite"),
        ((np.array([1.0]), np.array([True])), "at least 2 canaries"),
    ]:
        with pytest.raises(ValueError, match=match):
            one_run_epsilon_best(*bad, 1e-5, 0.95)
    # 0/1 integers are membership bits like bools
    assert one_run_epsilon_best(scores, bits.astype(int), 1e-5, 0.95) == one_run_epsilon_best(
        scores, bits, 1e-5, 0.95
    )
    with pytest.raises(ValueError, match="delta"):
        one_run_p_value(10, 5, 3, 1.0, -1e-5)
    with pytest.raises(ValueError, match="finite"):
        one_run_p_value(10, 5, 3, math.nan, 1e-5)
    with pytest.raises(ValueError, match="whole"):
        one_run_p_value(10, 5, 2.5, 1.0, 1e-5)
    with pytest.raises(ValueError, match="confidence"):
        one_run_epsilon(10, 5, 3, 1e-5, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        ceilings(1, 1e-5, 0.95)
    assert gaussian_epsilon(1.0, 0.0) == math.inf  # a Gaussian mechanism is not pure DP


def test_huge_canary_counts_are_chunked_not_tabled():
    """m = 10^6 canaries: the p-value table is chunked, so a vector of 50 guess counts at
    r = 10^5 is computed 4M cells at a time, not 5 10^6 at once, and agrees with the scalar."""
    m, r = 10**6, 10**5
    v = np.linspace(r // 2, r, 50).astype(int)
    p = one_run_p_value(m, r, v, 0.5, 1e-9)
    assert p.shape == v.shape and np.all(np.diff(p) <= 1e-12)
    assert p[-7] == pytest.approx(float(one_run_p_value(m, r, int(v[-7]), 0.5, 1e-9)), rel=1e-9)
