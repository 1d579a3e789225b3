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
``exposure ~ -log2 F(logppl(s))`` (capped at ``log2 |R|``).  The fit must agree with the
sample it was fitted to: where ``c`` sampled candidates (mid-rank count) score at or below the
secret and ``P(Binomial(n, F) >= floor(c)) < 10^-3`` (a fit degenerate on tied values, say),
the sample's own mid-rank fraction ``c / n`` is used instead.

Ties: a candidate with exactly the secret's log-perplexity counts half (the secret's mid-rank
in its tie block), so a model that scores every candidate alike gives ``rank = (|R| + 1) / 2``,
about 1 bit, not ``log2 |R|``.  A NaN or infinite log-perplexity is refused: NaN compares
false with everything and would silently rank the secret first.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from .inputs import finite_scores

__all__ = ["exposure_exact", "exposure_extrapolated", "random_exposure"]

FIT_DISAGREES = 1e-3  # P(so many samples at or below the secret | the fit) that rejects a fit

random_exposure = 1 / math.log(2)
"""Expected exposure of a secret the model knows nothing about (bits)."""


def exposure_exact(secret_logppl: float, candidate_logppl: np.ndarray, space_size: int) -> float:
    """Exposure from the log-perplexities of *all* ``space_size`` candidates other than the
    secret (``rank = 1 + #{candidates with lower log-perplexity}``; ties count half)."""
    _check_space(space_size)
    secret = float(finite_scores(secret_logppl, "the secret's log-perplexity", ndim=0))
    c = finite_scores(candidate_logppl, "candidate log-perplexities", ndim=1)
    if len(c) != space_size - 1:
        raise ValueError(
            f"exact exposure needs all {space_size - 1} other candidates, got {len(c)}"
        )
    rank = 1 + np.sum(c < secret) + 0.5 * np.sum(c == secret)
    return float(math.log2(space_size) - math.log2(rank))


def exposure_extrapolated(
    secret_logppl: float, sample_logppl: np.ndarray, space_size: int
) -> float:
    """Exposure from a uniform sample of candidate log-perplexities via a skew-normal fit
    (a sample without spread has nothing to fit: its mid-rank fraction is used instead)."""
    _check_space(space_size)
    secret_logppl = float(finite_scores(secret_logppl, "the secret's log-perplexity", ndim=0))
    x = finite_scores(sample_logppl, "sampled log-perplexities", ndim=1)
    if len(x) < 8:
        raise ValueError("the skew-normal extrapolation needs at least 8 sampled candidates")
    below = float(np.sum(x < secret_logppl) + 0.5 * np.sum(x == secret_logppl))
    log_f = math.nan
    if np.ptp(x) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            shape, loc, scale = stats.skewnorm.fit(x)
        log_f = float(stats.skewnorm.logcdf(secret_logppl, shape, loc, scale))
        k = math.floor(below)
        if k >= 1 and stats.binom.sf(k - 1, len(x), math.exp(log_f)) < FIT_DISAGREES:
            log_f = math.nan  # the fit contradicts its own sample
    if math.isnan(log_f):  # no spread to fit, or a bad fit: the sample's mid-rank fraction
        log_f = math.log(below / len(x)) if below > 0 else -math.inf
    bits = -log_f / math.log(2)
    return float(min(max(bits, 0.0), math.log2(space_size)))


def _check_space(space_size: int) -> None:
    if int(space_size) != space_size or space_size < 2:
        raise ValueError(f"the secret space needs at least 2 candidates, got {space_size}")
