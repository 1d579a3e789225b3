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
