"""Empirical lower bounds on epsilon, each at a stated confidence.

**One training run** (Steinke, Nasr, Jagielski 2023, Thm 5.2 / Algorithm 2).  ``m`` canaries are
each included independently with probability 1/2; after training the auditor guesses
"included" / "excluded" for ``r`` of them (abstaining on the rest) and ``v`` guesses are right.
If the training algorithm is (eps, delta)-DP, with ``q = e^eps / (1 + e^eps)`` and
``B ~ Binomial(r, q)``,

    P[v or more right] <= P[B >= v] + 2 m delta * max_{i=1..v} P[v - i <= B < v] / i.

The lower bound at confidence ``1 - beta`` is the largest eps whose right-hand side (the
p-value of "the algorithm is (eps, delta)-DP") is still below ``beta``: every smaller eps is
rejected at level beta.  The guess count ``r`` must not be chosen after looking at the
answers; :func:`one_run_epsilon_best` tries a fixed list of guess counts with a Bonferroni
correction.

**Attack rates** (Jagielski, Ullman, Oprea 2020).  (eps, delta)-DP bounds every test:
``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta``.  With one-sided
Clopper-Pearson bounds ``TPR_lo``, ``FPR_hi`` (each at ``(1 - confidence) / 2``),

    eps >= max(log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) / (1 - TPR_lo))).

This is rigorous when the trials are independent training runs; over many records of one run
the records' outcomes are not independent, so there it is indicative (the one-run bound is
the rigorous one).

:func:`gaussian_epsilon` is the exact (eps, delta) curve of a mu-GDP Gaussian mechanism, the
known truth the one-run bound is tested against.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "clopper_pearson",
    "epsilon_from_rates",
    "gaussian_epsilon",
    "guess_plans",
    "one_run_audit",
    "one_run_epsilon",
    "one_run_epsilon_best",
    "one_run_p_value",
]


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds ``(lower, upper)`` on a binomial proportion from ``k``
    successes in ``n`` trials; each holds with probability at least ``1 - alpha``."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def epsilon_from_rates(
    tp: int, positives: int, fp: int, negatives: int, delta: float, confidence: float
) -> float:
    """Jagielski et al. 2020: eps lower bound from ``tp`` of ``positives`` members flagged and
    ``fp`` of ``negatives`` non-members flagged, at ``confidence`` (see the module docstring)."""
    alpha = (1 - confidence) / 2
    tpr_lo, _ = clopper_pearson(tp, positives, alpha)
    _, fpr_hi = clopper_pearson(fp, negatives, alpha)
    best = 0.0
    if tpr_lo - delta > 0:
        best = max(best, math.log((tpr_lo - delta) / fpr_hi))
    if 1 - fpr_hi - delta > 0:
        best = max(best, math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return best


def one_run_p_value(m: int, r: int, v: np.ndarray | int, eps: np.ndarray | float, delta: float):
    """The p-value of "(eps, delta)-DP" after ``v`` right guesses of ``r`` over ``m`` canaries
    (Steinke et al. 2023, Algorithm 2), vectorized over ``v`` and ``eps`` (broadcast)."""
    v, eps = np.broadcast_arrays(np.asarray(v, dtype=np.int64), np.asarray(eps, dtype=float))
    if not (0 <= r <= m) or np.any(v < 0) or np.any(v > r) or np.any(eps < 0):
        raise ValueError(f"need 0 <= v <= r <= m and eps >= 0 (m={m}, r={r})")
    shape = v.shape
    v, eps = v.ravel(), eps.ravel()
    # Binomial(r, q) pmf in log space; q = e^eps / (1 + e^eps), the accuracy of eps-DP
    # randomized response: log q = -log(1 + e^-eps), log(1 - q) = -log(1 + e^eps)
    k = np.arange(r + 1)[None, :]
    log_choose = special.gammaln(r + 1) - special.gammaln(k + 1) - special.gammaln(r - k + 1)
    log_q = -np.logaddexp(0.0, -eps)[:, None]
    log_1q = -np.logaddexp(0.0, eps)[:, None]
    pmf = np.exp(log_choose + k * log_q + (r - k) * log_1q)  # (n, r + 1)
    below = np.concatenate([np.zeros((len(v), 1)), np.cumsum(pmf, axis=1)], axis=1)  # P[B < j]
    rows = np.arange(len(v))
    tail = np.clip(1.0 - below[rows, v], 0.0, 1.0)  # P[B >= v]
    i = np.arange(1, r + 1)[None, :]
    start = np.clip(v[:, None] - i, 0, None)
    window = (below[rows, v][:, None] - below[rows[:, None], start]) / i  # P[v-i <= B < v] / i
    window = np.where(i <= v[:, None], window, 0.0)
    alpha = window.max(axis=1) if r > 0 else np.zeros(len(v))
    return np.minimum(tail + 2 * m * delta * alpha, 1.0).reshape(shape)


def one_run_epsilon(
    m: int, r: int, v: np.ndarray | int, delta: float, confidence: float, *, iters: int = 50
) -> np.ndarray | float:
    """Largest eps that ``v`` right guesses of ``r`` (over ``m`` canaries) reject at level
    ``1 - confidence``: the one-run lower bound (vectorized over ``v``)."""
    beta = 1 - confidence
    scalar = np.ndim(v) == 0
    v = np.atleast_1d(np.asarray(v, dtype=np.int64))
    lo = np.zeros(len(v))  # p(lo) < beta, or lo = 0
    hi = np.ones(len(v))
    while True:  # expand hi until p(hi) >= beta everywhere
        grow = one_run_p_value(m, r, v, hi, delta) < beta
        if not grow.any():
            break
        hi = np.where(grow, hi * 2, hi)
        if hi.max() > 1e4:
            raise RuntimeError("one-run epsilon search did not terminate")
    for _ in range(iters):
        mid = (lo + hi) / 2
        reject = one_run_p_value(m, r, v, mid, delta) < beta
        lo = np.where(reject, mid, lo)
        hi = np.where(reject, hi, mid)
    return float(lo[0]) if scalar else lo


def guess_plans(m: int) -> list[tuple[int, int]]:
    """The fixed guess counts ``(k_in, k_out)`` tried by :func:`one_run_epsilon_best`: guess the
    ``k_in`` highest scores included and the ``k_out`` lowest excluded, for ``r`` in
    m/16, m/8, m/4, m/2, m, either all as "included" guesses or half and half."""
    plans: list[tuple[int, int]] = []
    for frac in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0):
        r = max(1, round(frac * m))
        for plan in ((r, 0), (r - r // 2, r // 2)):
            if plan not in plans and sum(plan) <= m and plan != (m, 0):
                plans.append(plan)
    return plans


def one_run_audit(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> dict[str, np.ndarray]:
    """The one-run bound from membership scores of ``m`` canaries (higher = more likely
    included), batched over a leading axis of independent trials: the best of
    :func:`guess_plans`, each at ``confidence`` Bonferroni-corrected over the plans, so the
    reported bound holds at ``confidence`` overall.  Returns arrays ``epsilon``, ``guesses``
    (r), ``correct`` (v), ``guessed_in``, ``guessed_out``."""
    scores, included = np.atleast_2d(scores).astype(float), np.atleast_2d(included).astype(bool)
    trials, m = scores.shape
    if m == 0 or included.shape != scores.shape:
        raise ValueError("need one inclusion bit per score and at least one canary")
    plans = guess_plans(m)
    each = 1 - (1 - confidence) / len(plans)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(included, order, axis=1)  # inclusion bits, best score first
    out = {
        k: np.zeros(trials) for k in ("epsilon", "guesses", "correct", "guessed_in", "guessed_out")
    }
    for p, (k_in, k_out) in enumerate(plans):
        right = ranked[:, :k_in].sum(1) + (~ranked[:, m - k_out :]).sum(1)
        values, inverse = np.unique(right, return_inverse=True)
        eps = np.atleast_1d(one_run_epsilon(m, k_in + k_out, values, delta, each))[inverse]
        better = (eps > out["epsilon"]) | (p == 0)
        for key, value in (
            ("epsilon", eps),
            ("guesses", k_in + k_out),
            ("correct", right),
            ("guessed_in", k_in),
            ("guessed_out", k_out),
        ):
            out[key] = np.where(better, value, out[key])
    return out


def one_run_epsilon_best(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> dict[str, float | int]:
    """:func:`one_run_audit` of one run, with the ceiling (the bound if every guess were
    right) and the number of plans tried."""
    res = one_run_audit(scores, included, delta, confidence)
    m = len(np.atleast_1d(scores))
    plans = guess_plans(m)
    each = 1 - (1 - confidence) / len(plans)
    ceiling = max(float(one_run_epsilon(m, a + b, a + b, delta, each)) for a, b in plans)
    out: dict[str, float | int] = {"epsilon": float(res["epsilon"][0])}
    out |= {k: int(res[k][0]) for k in ("guesses", "correct", "guessed_in", "guessed_out")}
    return out | {"canaries": m, "plans": len(plans), "ceiling": ceiling}


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon at ``delta`` of a mu-GDP mechanism (a Gaussian mechanism with sensitivity
    / noise std = mu): the root of ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta``."""

    def excess(eps: float) -> float:
        a = stats.norm.cdf(-eps / mu + mu / 2)
        b = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
        return a - b - delta

    if excess(0.0) <= 0:
        return 0.0
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return float(optimize.brentq(excess, 0.0, hi, xtol=1e-12))
