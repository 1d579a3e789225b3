"""Canary exposure (Carlini et al. 2019, "The Secret Sharer").

For a canary with secret ``s`` in a secret space ``R`` (``10^d`` numbers of ``d`` digits), rank
every candidate ``r`` in ``R`` by the log-perplexity the model gives the canary sentence with
``r`` in place of ``s`` (lowest first).  Then

    exposure(s) = log2 |R| - log2 rank(s),

between 0 and ``log2 |R|`` bits; a secret the model has not seen has expected exposure
``1 / ln 2 ~ 1.44`` bits, and exposure ``log2 |R|`` means the model ranks the true secret first:
an attacker who knows the template finds it with one guess (in general with about
``2^(log2 |R| - exposure)`` guesses).

Exactly, by enumerating ``R`` (:func:`exposure_exact`), when ``|R|`` is small.  Otherwise by the
paper's extrapolation (:func:`exposure_extrapolated`): fit a skew-normal distribution to the
log-perplexities of a uniform sample of candidates and read the rank fraction off its CDF,
``exposure ~ -log2 F(logppl(s))`` (capped at ``log2 |R|``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

__all__ = ["exposure_exact", "exposure_extrapolated", "random_exposure"]

random_exposure = 1 / math.log(2)
"""Expected exposure of a secret the model knows nothing about (bits)."""


def exposure_exact(secret_logppl: float, candidate_logppl: np.ndarray, space_size: int) -> float:
    """Exposure from the log-perplexities of *all* ``space_size`` candidates other than the
    secret (``rank = 1 + #{candidates with lower log-perplexity}``; ties count half)."""
    c = np.asarray(candidate_logppl, dtype=float)
    if len(c) != space_size - 1:
        raise ValueError(
            f"exact exposure needs all {space_size - 1} other candidates, got {len(c)}"
        )
    rank = 1 + np.sum(c < secret_logppl) + 0.5 * np.sum(c == secret_logppl)
    return float(math.log2(space_size) - math.log2(rank))


def exposure_extrapolated(
    secret_logppl: float, sample_logppl: np.ndarray, space_size: int
) -> float:
    """Exposure from a uniform sample of candidate log-perplexities via a skew-normal fit."""
    x = np.asarray(sample_logppl, dtype=float)
    if len(x) < 8:
        raise ValueError("the skew-normal extrapolation needs at least 8 sampled candidates")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        shape, loc, scale = stats.skewnorm.fit(x)
    log_f = float(stats.skewnorm.logcdf(secret_logppl, shape, loc, scale))
    bits = -log_f / math.log(2)
    return float(min(max(bits, 0.0), math.log2(space_size)))
