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

**f-DP in one run** (Mahloujifar, Melis, Chaudhuri 2024).  The same game, tested against a
whole trade-off curve ``f`` (symmetric) instead of one (eps, delta) pair.  Write
``g(x) = f(1 - x)``: under f-DP an event of probability ``x`` when a canary is in has
probability at least ``g(x)`` when it is out, and vice versa.  With ``r = beta v / m``,
``h = beta (k - v) / m`` (``k`` guesses) and, for ``i = v - 1, ..., 0``,

    h' = max(h, g(r)),   r <- min(1, r + i / (k - i) (h' - h)),   h <- h'

the hypothesis "f-DP" is rejected at level ``beta`` when ``r + h > k / m``
(their Theorem for the game with abstention).  Against the Gaussian curves
``g_mu(x) = Phi(Phi^-1(x) - mu)`` the rejected set of ``mu`` is an interval ``[0, mu_lo)``:
the run is not ``mu``-GDP for any ``mu < mu_lo``, and ``eps(mu_lo, delta)`` of the GDP curve
is the f-DP lower bound on epsilon (it assumes the run's curve is Gaussian; against the curve
a ledger actually implies, :func:`ledger_tradeoff`, the test needs no such assumption).  At the
same ``m`` it certifies more than the (eps, delta) bound (1.2 to 2 times in
``benchmarks/audit.py planted``), and its ceiling is about twice as high.

**The ceiling** of either bound is its value when every guess is right: the most ``m``
canaries can show at the stated confidence, whatever the training did.

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
from collections.abc import Callable, Sequence

import numpy as np
from scipy import optimize, special, stats

from .inputs import finite_scores, membership_bits, probability

Tradeoff = Callable[[np.ndarray], np.ndarray]
"""``g(x) = f(1 - x)`` of a symmetric trade-off function ``f``, elementwise (non-decreasing)."""

__all__ = [
    "Tradeoff",
    "ceilings",
    "clopper_pearson",
    "epsilon_from_rates",
    "fdp_audit",
    "fdp_gaussian_mu",
    "fdp_rejects",
    "fdp_tests",
    "gaussian_epsilon",
    "gaussian_tradeoff",
    "guess_plans",
    "ledger_tradeoff",
    "one_run_audit",
    "one_run_epsilon",
    "one_run_epsilon_best",
    "one_run_p_value",
    "plan_counts",
    "tie_order",
]


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds ``(lower, upper)`` on a binomial proportion from ``k``
    successes in ``n`` trials; each holds with probability at least ``1 - alpha``."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    probability(alpha, "alpha")
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


def epsilon_from_rates(
    tp: int, positives: int, fp: int, negatives: int, delta: float, confidence: float
) -> float:
    """Jagielski et al. 2020: eps lower bound from ``tp`` of ``positives`` members flagged and
    ``fp`` of ``negatives`` non-members flagged, at ``confidence`` (see the module docstring)."""
    probability(delta, "delta", open_low=False)
    alpha = (1 - probability(confidence, "confidence")) / 2
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
    v = np.asarray(v)
    if v.dtype.kind not in "iu" and not (v.dtype.kind == "f" and np.all(v == np.round(v))):
        raise ValueError(f"right guesses v must be whole numbers, got {v.ravel()[:3].tolist()}")
    if int(m) != m or int(r) != r:
        raise ValueError(f"canaries m and guesses r must be whole numbers, got m={m}, r={r}")
    m, r = int(m), int(r)
    probability(delta, "delta", open_low=False, open_high=False)
    v, eps = np.broadcast_arrays(v.astype(np.int64), np.asarray(eps, dtype=float))
    if not np.isfinite(eps).all():
        raise ValueError("eps must be finite")
    if not (0 <= r <= m) or np.any(v < 0) or np.any(v > r) or np.any(eps < 0):
        raise ValueError(f"need 0 <= v <= r <= m and eps >= 0 (m={m}, r={r})")
    shape = v.shape
    v, eps = v.ravel(), eps.ravel()
    rows = max(1, _CELLS // (r + 1))  # chunks of rows bound the (rows, r + 1) tables
    out = [
        _p_values(m, r, v[a : a + rows], eps[a : a + rows], delta) for a in range(0, len(v), rows)
    ]
    return (np.concatenate(out) if out else np.zeros(0)).reshape(shape)


_CELLS = 1 << 22  # table cells per chunk of one_run_p_value (32 MiB of float64)


def _p_values(m: int, r: int, v: np.ndarray, eps: np.ndarray, delta: float) -> np.ndarray:
    """:func:`one_run_p_value` of flat arrays ``v``, ``eps``."""
    # Binomial(r, q) pmf in log space; q = e^eps / (1 + e^eps), the accuracy of eps-DP
    # randomized response: log q = -log(1 + e^-eps), log(1 - q) = -log(1 + e^eps)
    k = np.arange(r + 1)[None, :]
    log_choose = special.gammaln(r + 1) - special.gammaln(k + 1) - special.gammaln(r - k + 1)
    log_q = -np.logaddexp(0.0, -eps)[:, None]
    log_1q = -np.logaddexp(0.0, eps)[:, None]
    pmf = np.exp(log_choose + k * log_q + (r - k) * log_1q)  # (n, r + 1)
    below = np.concatenate([np.zeros((len(v), 1)), np.cumsum(pmf, axis=1)], axis=1)  # P[B < j]
    rows = np.arange(len(v))
    # P[B >= v] summed from the top: no cancellation in 1 - P[B < v] for small tails
    above = np.cumsum(pmf[:, ::-1], axis=1)[:, ::-1]
    tail = np.clip(above[rows, v], 0.0, 1.0)  # v <= r: a column of the table
    i = np.arange(1, r + 1)[None, :]
    start = np.clip(v[:, None] - i, 0, None)
    window = (below[rows, v][:, None] - below[rows[:, None], start]) / i  # P[v-i <= B < v] / i
    window = np.where(i <= v[:, None], window, 0.0)
    alpha = window.max(axis=1) if r > 0 else np.zeros(len(v))
    return np.minimum(tail + 2 * m * delta * alpha, 1.0)


def one_run_epsilon(
    m: int, r: int, v: np.ndarray | int, delta: float, confidence: float, *, iters: int = 50
) -> np.ndarray | float:
    """Largest eps that ``v`` right guesses of ``r`` (over ``m`` canaries) reject at level
    ``1 - confidence``: the one-run lower bound (vectorized over ``v``).

    Bisection keeps ``p(lo) < beta`` at every step, so the result is always a rejected eps,
    and rejecting eps rejects every smaller one ((eps', delta)-DP implies (eps, delta)-DP for
    eps' < eps): the bound is valid even where the p-value is not monotone in eps (its delta
    term need not be); there it may be below the largest rejected eps, never above."""
    beta = 1 - probability(confidence, "confidence")
    scalar = np.ndim(v) == 0
    v = np.atleast_1d(np.asarray(v))  # one_run_p_value checks it is whole numbers
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


_TIE_SEED = 0x71E5  # the tie-breaking order of plan_counts (public, fixed: reproducible)


def tie_order(m: int) -> np.ndarray:
    """The fixed pseudo-random order that breaks ties between equal canary scores."""
    return np.random.default_rng(_TIE_SEED).permutation(m)


def plan_counts(
    scores: np.ndarray, included: np.ndarray
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The guess plans of :func:`guess_plans` and, for each plan and trial, the right guesses
    when the ``k_in`` highest scores are guessed included and the ``k_out`` lowest excluded:
    ``(plans, right)`` with ``right`` of shape (plans, trials).  Scores are batched over a
    leading axis of independent trials (higher = more likely included).

    Equal scores are ranked by :func:`tie_order`, a fixed order drawn independently of the
    inclusion bits, so the guesses stay a function of the scores alone, as the theorem needs.
    (Ranking ties by position would not: with every score equal and the members listed
    first, "guess the first k included" would be right every time.)"""
    scores = finite_scores(np.atleast_2d(scores), "canary scores", ndim=2)
    included = membership_bits(np.atleast_2d(included), "canary inclusion bits")
    m = scores.shape[1]
    if included.shape != scores.shape:
        raise ValueError(
            f"need one inclusion bit per score: scores {scores.shape}, bits {included.shape}"
        )
    if m < 2:
        raise ValueError(
            f"the one-run bound needs at least 2 canaries, got {m}: with one, any guess is a "
            "coin flip. Fix: insert more canaries (data.canaries)"
        )
    plans = guess_plans(m)
    tie = np.broadcast_to(tie_order(m), scores.shape)
    order = np.lexsort((tie, -scores), axis=1)  # score descending, then the tie order
    ranked = np.take_along_axis(included, order, axis=1)  # inclusion bits, best score first
    right = np.stack(
        [ranked[:, :a].sum(1) + (~ranked[:, m - b :]).sum(1) for a, b in plans]
    ).astype(np.int64)
    return plans, right


def _best_plan(
    plans: list[tuple[int, int]], right: np.ndarray, values: np.ndarray, key: str
) -> dict[str, np.ndarray]:
    """Per trial, the plan with the largest ``values`` (shape (plans, trials))."""
    best = np.argmax(values, axis=0)
    cols = np.arange(values.shape[1])
    k_in = np.array([a for a, _ in plans])[best]
    k_out = np.array([b for _, b in plans])[best]
    return {
        key: values[best, cols],
        "guesses": k_in + k_out,
        "correct": right[best, cols],
        "guessed_in": k_in,
        "guessed_out": k_out,
    }


def one_run_audit(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> dict[str, np.ndarray]:
    """The one-run bound from membership scores of ``m`` canaries (higher = more likely
    included), batched over a leading axis of independent trials: the best of
    :func:`guess_plans`, each at ``confidence`` Bonferroni-corrected over the plans, so the
    reported bound holds at ``confidence`` overall.  Returns arrays ``epsilon``, ``guesses``
    (r), ``correct`` (v), ``guessed_in``, ``guessed_out``."""
    plans, right = plan_counts(scores, included)
    m = np.atleast_2d(scores).shape[1]
    each = 1 - (1 - confidence) / len(plans)
    eps = np.zeros(right.shape, dtype=float)
    for p, (k_in, k_out) in enumerate(plans):
        values, inverse = np.unique(right[p], return_inverse=True)
        eps[p] = np.atleast_1d(one_run_epsilon(m, k_in + k_out, values, delta, each))[inverse]
    return _best_plan(plans, right, eps, "epsilon")


def one_run_epsilon_best(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> dict[str, float | int]:
    """:func:`one_run_audit` of one run, with the ceiling (the bound if every guess were
    right) and the number of plans tried."""
    res = one_run_audit(scores, included, delta, confidence)
    m = len(np.atleast_1d(scores))
    plans = guess_plans(m)
    ceiling = ceilings(m, delta, confidence)["one_run"]
    out: dict[str, float | int] = {"epsilon": float(res["epsilon"][0])}
    out |= {k: int(res[k][0]) for k in ("guesses", "correct", "guessed_in", "guessed_out")}
    return out | {"canaries": m, "plans": len(plans), "ceiling": ceiling}


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon at ``delta`` of a mu-GDP mechanism (a Gaussian mechanism with sensitivity
    / noise std = mu): the root of ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) = delta``
    (``0`` for ``mu = 0``: identical distributions, e.g. the ceiling of too few canaries;
    ``inf`` for ``delta = 0`` and ``mu > 0``: a Gaussian mechanism is not pure DP)."""
    probability(delta, "delta", open_low=False, open_high=False)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    if mu <= 0:
        return 0.0
    if delta == 0:
        return math.inf

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


# -- f-DP in one run (Mahloujifar, Melis, Chaudhuri 2024) ---------------------------------------


def gaussian_tradeoff(mu: np.ndarray | float) -> Tradeoff:
    """``g(x) = Phi(Phi^-1(x) - mu)``: the mu-GDP curve (``mu`` broadcast against ``x``)."""
    mu = np.asarray(mu, dtype=float)
    return lambda x: stats.norm.cdf(stats.norm.ppf(x) - mu)


def fdp_rejects(
    m: int, k: np.ndarray | int, v: np.ndarray | int, g: Tradeoff, beta: float
) -> np.ndarray:
    """Whether ``v`` right of ``k`` guesses over ``m`` canaries reject "f-DP" at level
    ``beta`` (the recursion of the module docstring), vectorized over ``k`` and ``v``; ``g``
    gets and returns arrays of their broadcast shape (per-entry curves are allowed)."""
    k, v = np.broadcast_arrays(np.asarray(k, dtype=np.int64), np.asarray(v, dtype=np.int64))
    if m < 1 or np.any(v < 0) or np.any(v > k) or np.any(k > m) or not 0 < beta < 1:
        raise ValueError(f"need 0 <= v <= k <= m, m >= 1 and 0 < beta < 1 (m={m})")
    k, v = k.astype(float), v.astype(float)
    r, h = beta * v / m, beta * (k - v) / m
    done = v <= 0
    step = 0
    while not done.all():  # each entry stops once h is a fixed point (few iterations)
        i = v - 1 - step
        h_new = np.maximum(h, g(r))
        grown = h_new > h
        r_new = np.minimum(r + i / np.maximum(k - i, 1.0) * (h_new - h), 1.0)
        r, h = np.where(done, r, r_new), np.where(done, h, h_new)
        done = done | ~grown | (i <= 0)
        step += 1
    return r + h > k / m


def fdp_gaussian_mu(
    m: int, k: np.ndarray | int, v: np.ndarray | int, confidence: float, *, iters: int = 26
) -> np.ndarray:
    """Largest ``mu`` such that "mu'-GDP" is rejected for every ``mu' < mu``, at
    ``confidence`` (0 if even mu = 0, perfect privacy, is not rejected); vectorized."""
    beta = 1 - probability(confidence, "confidence")
    k, v = np.broadcast_arrays(np.atleast_1d(k), np.atleast_1d(v))
    hi = np.full(k.shape, 16.0)
    if fdp_rejects(m, k, v, gaussian_tradeoff(hi), beta).any():
        raise RuntimeError("f-DP search: mu = 16 rejected; raise the bracket")
    lo = np.zeros(k.shape)
    any_ = fdp_rejects(m, k, v, gaussian_tradeoff(lo), beta)
    for _ in range(iters):
        mid = (lo + hi) / 2
        rej = fdp_rejects(m, k, v, gaussian_tradeoff(mid), beta)
        lo, hi = np.where(rej, mid, lo), np.where(rej, hi, mid)
    return np.where(any_, lo, 0.0)


def fdp_audit(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> dict[str, np.ndarray]:
    """The f-DP one-run bound against Gaussian curves, batched over trials like
    :func:`one_run_audit` (same guess plans, Bonferroni over them): arrays ``mu``,
    ``epsilon`` (of the mu-GDP curve at ``delta``), ``guesses``, ``correct``, ..."""
    plans, right = plan_counts(scores, included)
    m = np.atleast_2d(scores).shape[1]
    each = 1 - (1 - confidence) / len(plans)
    ks = np.array([a + b for a, b in plans])[:, None]
    pairs = np.unique(np.stack(np.broadcast_arrays(ks, right), -1).reshape(-1, 2), axis=0)
    mus = dict(
        zip(map(tuple, pairs), fdp_gaussian_mu(m, pairs[:, 0], pairs[:, 1], each), strict=True)
    )
    mu = np.vectorize(lambda a, b: mus[(a, b)], otypes=[float])(*np.broadcast_arrays(ks, right))
    out = _best_plan(plans, right, mu, "mu")
    eps_of = {x: gaussian_epsilon(x, delta) if x > 0 else 0.0 for x in np.unique(out["mu"])}
    out["epsilon"] = np.array([eps_of[x] for x in out["mu"]])
    return out


def fdp_tests(
    scores: np.ndarray, included: np.ndarray, curves: Sequence[Tradeoff], confidence: float
) -> np.ndarray:
    """For each curve and trial: is "f-DP" rejected by some guess plan at ``confidence``
    (Bonferroni over the plans)?  Shape (curves, trials)."""
    plans, right = plan_counts(scores, included)
    m = np.atleast_2d(scores).shape[1]
    beta = (1 - confidence) / len(plans)
    ks = np.broadcast_to(np.array([a + b for a, b in plans])[:, None], right.shape)
    return np.stack([fdp_rejects(m, ks, right, g, beta).any(axis=0) for g in curves])


def ledger_tradeoff(events: Sequence, *, grid: int = 1000) -> Tradeoff:
    """``g`` of the trade-off curve a ledger's events imply, from their privacy profile by the
    PLD accountant (pessimistic, so below the true curve): ``f(a) = max(0, max_eps
    max(1 - delta(eps) - e^eps a, e^-eps (1 - delta(eps) - a)))`` over a grid of eps >= 0.
    Evaluated at the largest grid point ``x_j <= x`` (``g`` is non-decreasing), so every
    approximation makes the curve less private: a rejection stays valid."""
    from accountants import PldAccountant

    deltas = PldAccountant().profile(events)
    top, last = 1.0, 1.0
    while top < 512:  # up to where delta is negligible or only the mass at infinity is left
        d_top = deltas([top])[0]
        if d_top <= 1e-14 or d_top >= last * (1 - 1e-9):
            break
        top, last = 2 * top, d_top
    eps = np.linspace(0.0, top, grid)
    d = deltas(eps)
    xs = np.unique(np.concatenate([[0.0], np.logspace(-16, 0, 2000), np.linspace(0, 1, 1001)]))
    gs = np.zeros(len(xs))
    for start in range(0, len(eps), 256):  # chunks bound the (x, eps) table
        e, de = eps[start : start + 256], d[start : start + 256]
        low = np.exp(-e)[None, :] * (xs[:, None] - de[None, :])
        high = 1 - de[None, :] - np.exp(e)[None, :] * (1 - xs[:, None])
        gs = np.maximum(gs, np.maximum(low, high).max(1))
    gs = np.maximum.accumulate(np.clip(gs, 0.0, 1.0))

    def g(x: np.ndarray) -> np.ndarray:
        j = np.searchsorted(xs, np.clip(x, 0.0, 1.0), side="right") - 1
        return gs[np.clip(j, 0, len(xs) - 1)]

    return g


def ceilings(m: int, delta: float, confidence: float) -> dict[str, float]:
    """The most ``m`` canaries can show at ``confidence`` (every guess right, best plan):
    ``one_run`` (Steinke et al.) and ``fdp`` (Gaussian f-DP, as epsilon at ``delta``) and
    ``fdp_mu``."""
    if m < 2:
        raise ValueError(f"a one-run bound needs at least 2 canaries, got {m}")
    plans = guess_plans(m)
    each = 1 - (1 - confidence) / len(plans)
    ks = np.array([a + b for a, b in plans])
    steinke = max(float(one_run_epsilon(m, int(k), int(k), delta, each)) for k in ks)
    mu = float(fdp_gaussian_mu(m, ks, ks, each).max())
    return {"one_run": steinke, "fdp": gaussian_epsilon(mu, delta), "fdp_mu": mu}
