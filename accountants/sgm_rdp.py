"""Per-step RDP of the Poisson-subsampled Gaussian mechanism at many orders at once (numpy).

One step with sampling rate ``0 < q < 1`` and noise multiplier ``sigma`` is
``(alpha, log(A_alpha) / (alpha - 1))``-RDP (Mironov, Talwar & Zhang 2019), with

    A_alpha = E_{z ~ N(0, sigma^2)} [(1 - q + q exp((2 z - 1) / (2 sigma^2)))^alpha].

This module computes the series ``dp_accounting`` computes term by term in Python, vectorized
over orders and terms, in log space; :func:`subsampled_gaussian_rdp` is equal to
``dp_accounting``'s ``_compute_rdp_poisson_subsampled_gaussian`` up to rounding, or larger
where that function truncates a series early.

**Integer alpha** (binomial expansion): ``A = sum_{i=0}^{alpha} p_i exp(x_i)`` with ``p_i`` the
Binomial(alpha, q) weights and ``x_i = i (i - 1) / (2 sigma^2)``.  Since the ``p_i`` sum to 1,

    A - 1 = S = sum_{i=2}^{alpha} p_i expm1(x_i),   log A = log1p(S),

a sum of positive terms: full relative precision even where ``A - 1`` is 1e-15, where the
log-space sum of ``p_i exp(x_i)`` keeps only an absolute error of ~1e-16 in ``log A``.

**Fractional alpha** (Mironov et al. 2019, Sec. 3.3, as in ``dp_accounting``): with
``z0 = sigma^2 log(1/q - 1) + 1/2``, ``Q`` the standard normal tail and ``j = alpha - i``,

    s0_i = |C(alpha, i)| q^i (1-q)^j exp((i^2 - i) / (2 sigma^2)) Q((i - z0) / sigma)
    s1_i = |C(alpha, i)| q^j (1-q)^i exp((j^2 - j) / (2 sigma^2)) Q((z0 - j) / sigma)

and ``A <= sum_{i>=0} (s0_i + s1_i)`` (absolute values of the generalized binomial
coefficients; the bound both use).  *Tail bound.*  Algebra gives ``s0_i = |C(alpha, i)| w0_i``
with ``w0_i = (1-q)^alpha exp(-z0^2 / (2 sigma^2)) M((i - z0) / sigma)`` and
``M(x) = exp(x^2 / 2) Q(x)``, which decreases on the whole line (Mills ratio); likewise
``s1_i = |C(alpha, i)| w1_i`` with ``M((i + z0 - alpha) / sigma)``.  So ``w0_i + w1_i`` does
not increase in ``i`` and, for ``n >= floor(alpha)``, ``sum_{i>n} |C(alpha, i)| =
|C(alpha - 1, n)|`` (alternating partial sums of ``(1 - 1)^alpha``), hence

    sum_{i>n} (s0_i + s1_i) <= (w0_n + w1_n) |C(alpha - 1, n)|.

The value returned is the sum of the computed terms plus this bound (a true upper bound of
the series at any truncation), with terms computed until the bound is below 2^-60 of the sum
or :data:`MAX_TERMS` terms.

**Convergence handling, as dp_accounting's.**  ``dp_accounting`` stops at the first ``i`` where
``s0_i < s0_{i-1}``, ``s1_i < s1_{i-1}`` and ``max(s0_i, s1_i) < total_i * e^-30`` (running
total), and excludes the order (RDP ``inf``) when that never happens in :data:`MAX_TERMS`
terms.  The same rule runs here on the same terms: an order it excludes is ``inf`` here too,
and an order where one of the rule's comparisons at its stopping point is within rounding
(1e-9 relative) is recomputed by ``dp_accounting`` itself and the larger value kept, so that
this function never reports a finite value where dp_accounting reports ``inf``.

**Rounding.**  The result is ``log A`` rounded up by :data:`LOG_A_SLACK` (relative) plus
:data:`LOG_A_SLACK_ABS` (absolute, the rounding of a log-space sum near 1), bounds on the
floating-point error of the sums measured against 50-digit arithmetic with a factor of 10 to
spare (``tests/accountants/test_sgm_rdp.py``), so that the value stays an upper bound on the
exact one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln, log_ndtr

MAX_TERMS = 1000
"""Terms of a fractional order's series (``dp_accounting``'s ``_MAX_STEPS_LOG_A_FRAC``)."""

_STOP_GAP = 30.0  # dp_accounting's stopping gap (log units)
_TAIL_GAP = 60.0 * math.log(2.0)  # stop adding terms once the tail bound is 2^-60 of A ...
_TAIL_REL = 1e-12  # ... or adds at most this fraction of log A
_RULE_TOL = 1e-9  # a stopping comparison closer than this (relative) is decided by dp itself
_FIRST = 64  # terms per order in the first block; more blocks only for orders not done

LOG_A_SLACK = 1e-11
"""Relative round-up of ``log A`` (floating-point error of the log-space sums, with spare)."""

LOG_A_SLACK_ABS = 2e-15
"""Absolute round-up of ``log A``: the rounding of a sum near 1 taken to the log."""


@functools.lru_cache(maxsize=64)
def _integer_layout(orders: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the integer orders among ``orders``: (their positions, the flat (alpha, i) pairs with
    2 <= i <= alpha of all of them, and the start of each order's run in the flat arrays)."""
    pos = np.array([k for k, a in enumerate(orders) if float(a).is_integer()], dtype=np.intp)
    alphas = np.array([orders[k] for k in pos], dtype=np.float64)
    counts = (alphas - 1).astype(np.intp)  # i = 2..alpha
    flat_a = np.repeat(alphas, counts)
    starts = (np.cumsum(counts) - counts).astype(np.intp)
    flat_i = np.arange(flat_a.size, dtype=np.float64) - np.repeat(starts, counts) + 2.0
    for arr in (pos, flat_a, flat_i, starts):
        arr.setflags(write=False)
    return pos, np.stack([flat_a, flat_i]), starts


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """``log(expm1(x))`` for ``x > 0``, without overflow."""
    big = x > 1.0
    safe = np.where(big, 1.0, x)
    return np.where(big, x + np.log1p(-np.exp(-np.where(big, x, 1.0))), np.log(np.expm1(safe)))


def _log_a_integer(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """(positions, log A) of the integer orders, by ``log1p(sum_{i>=2} p_i expm1(x_i))``."""
    pos, (a, i), starts = _integer_layout(orders)
    if not pos.size:
        return pos, np.zeros(0)
    log_p = (
        gammaln(a + 1.0)
        - gammaln(i + 1.0)
        - gammaln(a - i + 1.0)
        + i * math.log(q)
        + (a - i) * math.log1p(-q)
    )
    terms = log_p + _log_expm1(i * (i - 1.0) / (2.0 * sigma * sigma))
    top = np.maximum.reduceat(terms, starts)
    counts = np.diff(np.append(starts, terms.size))
    log_s = top + np.log(np.add.reduceat(np.exp(terms - np.repeat(top, counts)), starts))
    return pos, np.logaddexp(0.0, log_s)  # log(1 + S)


@functools.lru_cache(maxsize=8)
def _log_factorials(n: int) -> np.ndarray:
    """``log(i!)`` for ``i < n`` (read-only)."""
    out = gammaln(np.arange(n, dtype=np.float64) + 1.0)
    out.setflags(write=False)
    return out


def _fractional_terms(
    q: float, sigma: float, a: np.ndarray, i: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log s0, log s1, log |C(a, i)|) for orders ``a[:, None]`` and term indices ``i[None, :]``."""
    a = a[:, None]
    i = i[None, :]
    j = a - i
    z0 = sigma * sigma * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    log_c = (gammaln(a + 1.0) - _log_factorials(int(i[0, -1]) + 1)[int(i[0, 0]) :]) - gammaln(
        j + 1.0
    )  # log |C(a, i)|
    two_s2 = 2.0 * sigma * sigma
    log_s0 = log_c + i * log_q + j * log_1mq + (i * i - i) / two_s2 + log_ndtr((z0 - i) / sigma)
    log_s1 = log_c + j * log_q + i * log_1mq + (j * j - j) / two_s2 + log_ndtr((j - z0) / sigma)
    return log_s0, log_s1, log_c


def _dp_accounting_log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """``dp_accounting``'s own fractional-order ``log A`` (its warnings silenced)."""
    import logging

    from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp

    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return float(dp_rdp._compute_log_a_frac(q, sigma, alpha))
    finally:
        logger.setLevel(previous)


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """``log A`` of fractional orders ``alphas``: the series with its tail bound (module doc)."""
    k = alphas.size
    out = np.full(k, np.inf)
    active = np.arange(k)  # orders still summing
    # dp_accounting's rule per order: running log total, last terms, stopped yet, near-ties
    total, last0, last1 = np.full(k, -np.inf), np.full(k, -np.inf), np.full(k, -np.inf)
    stopped = np.zeros(k, dtype=bool)
    undecided = np.zeros(k, dtype=bool)
    sums = np.full(k, -np.inf)  # log of the terms summed so far (max-shifted, accurate)
    start, end = 0, max(_FIRST, int(alphas.max()) + 2)  # n >= floor(alpha) for the tail bound
    while active.size:
        end = min(end, MAX_TERMS)
        idx = np.arange(start, end, dtype=np.float64)
        s0, s1, log_c = _fractional_terms(q, sigma, alphas[active], idx)
        rows = np.flatnonzero(~stopped[active])  # the rule, on orders it has not stopped yet
        if rows.size:
            at = active[rows]
            r0, r1 = s0[rows], s1[rows]
            run = np.logaddexp.accumulate(
                np.concatenate([total[at, None], np.logaddexp(r0, r1)], axis=1), axis=1
            )[:, 1:]
            m0 = np.concatenate([last0[at, None], r0[:, :-1]], axis=1) - r0
            m1 = np.concatenate([last1[at, None], r1[:, :-1]], axis=1) - r1
            m2 = run - _STOP_GAP - np.maximum(r0, r1)
            low = np.minimum(np.minimum(m0, m1), m2)  # > 0: the rule stops here
            fires = low > 0
            scale = 1.0 + np.maximum(np.maximum(np.abs(r0), np.abs(r1)), np.abs(run))
            close = np.abs(low) <= _RULE_TOL * scale  # the rule's verdict is within rounding
            hit = fires.any(axis=1)
            first = np.where(hit, np.argmax(fires, axis=1), idx.size - 1)
            upto = np.arange(idx.size)[None, :] <= first[:, None]
            undecided[at] |= (close & upto).any(axis=1)
            stopped[at] = hit
            total[at], last0[at], last1[at] = run[:, -1], r0[:, -1], r1[:, -1]
        # accurate sum of all terms so far, and the tail bound beyond the last one
        both = np.concatenate([sums[active, None], s0, s1], axis=1)
        peak = both.max(axis=1)
        sums[active] = peak + np.log(np.exp(both - peak[:, None]).sum(axis=1))
        n = end - 1
        a = alphas[active]
        log_tail = (
            np.logaddexp(s0[:, -1], s1[:, -1])
            - log_c[:, -1]
            + (gammaln(a) - gammaln(n + 1.0) - gammaln(a - n))
        )
        # close enough: the bound adds at most 1e-12 of log A (or 2^-60 of A)
        with np.errstate(invalid="ignore"):
            gap = np.maximum(_TAIL_GAP, -np.log(_TAIL_REL * sums[active]))
        done = stopped[active] & ((log_tail <= sums[active] - gap) | (end >= MAX_TERMS))
        out[active[done]] = np.logaddexp(sums[active[done]], log_tail[done])
        if end >= MAX_TERMS:  # the rest never met dp_accounting's rule: excluded (inf)
            break
        active = active[~done]
        start, end = end, int(2.5 * end)
    for k_ in np.flatnonzero(undecided):
        ref = _dp_accounting_log_a_frac(q, sigma, float(alphas[k_]))
        out[k_] = max(out[k_], ref) if math.isfinite(ref) else math.inf
    return out


def subsampled_gaussian_rdp(q: float, sigma: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step (rate ``q``, noise multiplier ``sigma``) at
    each of ``orders`` (all > 1): ``log(A_alpha) / (alpha - 1)``, ``inf`` where the series is
    excluded (see the module docstring); 0 for ``q = 0``, ``inf`` for ``sigma = 0``, and
    ``alpha / (2 sigma^2)`` for ``q = 1``."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sample rate must be in [0, 1], got {q!r}")
    if not sigma >= 0.0:
        raise ValueError(f"noise multiplier must be >= 0, got {sigma!r}")
    orders = tuple(float(a) for a in orders)
    a = np.asarray(orders, dtype=np.float64)
    if np.any(~(a > 1.0)) or np.any(np.isinf(a)):
        raise ValueError("orders must be finite and > 1")
    if q == 0.0:
        return np.zeros(a.size)
    if sigma == 0.0:
        return np.full(a.size, np.inf)
    if math.isinf(sigma):
        return np.zeros(a.size)
    if q == 1.0:
        return a / (2.0 * sigma * sigma)
    log_a = np.empty(a.size)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        pos, vals = _log_a_integer(q, sigma, orders)
        log_a[pos] = vals
        frac = np.setdiff1d(np.arange(a.size), pos, assume_unique=True)
        if frac.size:
            log_a[frac] = _log_a_fractional(q, sigma, a[frac])
    log_a = np.maximum(log_a, 0.0)  # A >= 1 (Jensen); rounding can only take it below
    log_a = log_a + LOG_A_SLACK * log_a
    log_a[frac] += LOG_A_SLACK_ABS  # integer orders have no sum near 1 (log1p form)
    return log_a / (a - 1.0)
