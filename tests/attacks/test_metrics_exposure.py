"""ROC/AUC against brute force; exposure, exact and extrapolated (Secret Sharer)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attacks.exposure import exposure_exact, exposure_extrapolated, random_exposure
from attacks.metrics import roc


def test_roc_auc_and_tpr_at_fpr_match_brute_force():
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounded: ties between and within classes
    neg = np.round(rng.normal(0.0, 1.0, 500), 1)
    r = roc(pos, neg)
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert r.auc == pytest.approx(pairs)
    for fpr in (0.001, 0.01, 0.1, 0.5):
        brute = max(
            (np.mean(pos >= t) for t in np.r_[np.inf, pos, neg] if np.mean(neg >= t) <= fpr),
            default=0.0,
        )
        assert r.tpr_at(fpr) == pytest.approx(brute)
    assert r.fpr[0] == r.tpr[0] == 0 and r.fpr[-1] == r.tpr[-1] == 1
    assert roc(np.ones(5), np.zeros(5)).auc == 1.0
    with pytest.raises(ValueError, match="finite"):
        roc(np.array([np.nan]), np.zeros(3))


def test_exact_exposure_from_ranks():
    space = 1000
    others = np.arange(1, space, dtype=float)  # log-perplexities 1..999
    assert exposure_exact(0.5, others, space) == pytest.approx(math.log2(space))  # rank 1
    assert exposure_exact(999.5, others, space) == pytest.approx(0.0)  # rank 1000
    assert exposure_exact(99.5, others, space) == pytest.approx(math.log2(space / 100))
    with pytest.raises(ValueError, match="all 999"):
        exposure_exact(1.0, others[:10], space)
    # an unseen secret (uniform rank) has mean exposure ~ 1 / ln 2 bits
    rng = np.random.default_rng(1)
    vals = [exposure_exact(rng.uniform(0, 1000), others, space) for _ in range(3000)]
    assert np.mean(vals) == pytest.approx(random_exposure, abs=0.1)


def test_extrapolated_exposure_agrees_with_exact_on_a_skewed_space():
    rng = np.random.default_rng(2)
    space = 100_000
    from scipy import stats

    law = stats.skewnorm(3.0, loc=40.0, scale=6.0)
    population = law.rvs(space - 1, random_state=rng)
    for quantile in (1e-2, 1e-3, 1e-4):
        secret = float(law.ppf(quantile))
        exact = exposure_exact(secret, population, space)
        approx = exposure_extrapolated(secret, rng.choice(population, 2000), space)
        assert approx == pytest.approx(exact, abs=1.0)
    assert exposure_extrapolated(-1e9, population[:100], space) == pytest.approx(math.log2(space))


def test_roc_edge_cases_against_closed_forms():
    # constant scores: one threshold, the diagonal; AUC and balanced accuracy exactly 0.5,
    # and conservatively no TPR at any FPR below 1 (there is no threshold in between)
    r = roc(np.full(7, 3.0), np.full(5, 3.0))
    assert r.auc == 0.5 and r.balanced_accuracy == 0.5
    assert r.tpr_at(0.5) == 0.0 and r.tpr_at(1.0) == 1.0
    # a single member: AUC = share of non-members below it + half the ties
    neg = np.array([0.0, 1.0, 2.0, 2.0, 3.0])
    assert roc(np.array([2.0]), neg).auc == pytest.approx((2 + 0.5 * 2) / 5)
    # reversing the scores mirrors the AUC
    rng = np.random.default_rng(3)
    pos, neg = np.round(rng.normal(0.5, 1, 50), 1), np.round(rng.normal(0, 1, 60), 1)
    assert roc(-pos, -neg).auc == pytest.approx(1 - roc(pos, neg).auc)
    # balanced accuracy: brute force over every threshold
    brute = max((np.mean(pos >= t) + np.mean(neg < t)) / 2 for t in np.r_[np.inf, pos, neg])
    assert roc(pos, neg).balanced_accuracy == pytest.approx(brute)


def test_roc_inputs_are_refused_clearly():
    from attacks.metrics import roc_of

    s = np.array([0.1, 0.4, 0.35, 0.8])
    ints, bools = roc_of(s, np.array([0, 0, 1, 1])), roc_of(s, np.array([0, 0, 1, 1], bool))
    assert ints.auc == bools.auc == 0.75 and np.array_equal(ints.tpr, bools.tpr)  # 3 of 4 pairs
    for bits, match in [
        (np.array([0, 2, 1, 1]), "0/1"),  # an index array, not a mask
        (np.array([0, 1, 1]), "one membership bit per score"),
        (np.array([1, 1, 1, 1]), "at least one member and one non-member"),
    ]:
        with pytest.raises(ValueError, match=match):
            roc_of(s, bits)
    with pytest.raises(ValueError, match="1-d"):
        roc(np.ones((2, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        roc(np.array([np.inf]), np.zeros(3))
    with pytest.raises(ValueError, match="fpr"):
        roc(s, s).tpr_at(1.5)


def test_exposure_ties_and_bad_inputs():
    space = 1000
    # every candidate tied with the secret: mid-rank (|R| + 1) / 2, about 1 bit
    assert exposure_exact(5.0, np.full(space - 1, 5.0), space) == pytest.approx(
        math.log2(space) - math.log2((space + 1) / 2)
    )
    others = np.arange(1, space, dtype=float)
    with pytest.raises(ValueError, match="finite"):
        exposure_exact(math.nan, others, space)  # NaN < x is False: it would rank first
    with pytest.raises(ValueError, match="finite"):
        exposure_exact(1.0, np.r_[others[:-1], math.nan], space)
    with pytest.raises(ValueError, match="at least 2"):
        exposure_exact(1.0, np.zeros(0), 1)
    # a sample without spread: its mid-rank fraction, never NaN
    flat = np.full(50, 7.0)
    assert exposure_extrapolated(7.0, flat, space) == pytest.approx(1.0)
    assert exposure_extrapolated(6.0, flat, space) == pytest.approx(math.log2(space))
    assert exposure_extrapolated(8.0, flat, space) == 0.0
    # tied values with a little spread: the skew-normal fit degenerates (it put 20 bits on a
    # secret tied with 7 of 8 samples); a fit its own sample contradicts gives way to the
    # mid-rank fraction 3.5 / 8
    tied = np.r_[np.full(7, 7.0), 7.5]
    assert exposure_extrapolated(7.0, tied, 10**6) == pytest.approx(-math.log2(3.5 / 8))
