"""Privacy-loss-distribution accountant, backed by ``dp_accounting.pld.PLDAccountant``.

Each distinct mechanism (q, sigma) is discretized once with the *pessimistic* connect-the-dots
construction (Doroshenko et al. 2022), whose discrete PLD is that of a pair of distributions
dominating the mechanism, then self-composed by FFT; the epsilon it reports is therefore an
upper bound (tail mass truncated during composition is moved to +infinity, pessimistically).
Both add and remove directions are composed and the worse one is reported.

Value discretization.  The error of the pessimistic estimate grows with the discretization
interval h relative to the spread of the *per-step* privacy loss, whose standard deviation for
small q is about ``s(q, sigma) = q * sqrt(expm1(1 / sigma^2))`` (chi-square divergence of one
step).  Unless given explicitly, h is

    h = clip(0.1 * min over distinct mechanisms of s(q, sigma), 1e-8, 1e-3),

which measured within ~0.1% of a 20x finer discretization over q in [1e-3, 1], sigma in
[0.5, 10], up to 10^5 steps, at cost roughly independent of the step count.  h depends only on
the *set* of mechanisms, not on their step counts: for a fixed set, the estimate is the exact
composition of fixed dominating pairs and hence non-decreasing in every step count, which the
budget filter relies on.

Many distinct mechanisms.  Composition costs about one discretization and FFT per distinct
mechanism; a ledger with more than ``max_exact_mechanisms`` (default 64) distinct costly
mechanisms is composed on the public grid of :mod:`accountants.grid` (q rounded up, sigma
down, at the finest level that leaves at most that many): an upper bound on the exact
composition, reported as such (:meth:`PldAccountant.grid_level`,
:func:`accountants.grid.describe`).

Floating-point floor.  The FFT composition carries rounding errors that are not pessimistic:
at delta = 1e-12 the exact delta at the reported epsilon was up to 3.5x delta (q = 1, sigma =
1, 10^5 steps: epsilon 52168 reported, 52223.5 exact; sigma = 5, 1000 steps: 63.816 for
63.819).  The measured absolute error stayed below ``0.003 u n`` (``u = 2^-52``, ``n`` the
bins of the composed pmf), so every result is computed at ``delta - DELTA_FLOOR_PER_BIN * n``
(and ``delta()`` adds it), ~300x the error measured; a delta at or below that floor is refused
(:class:`DeltaBelowFloorError`: use a larger delta or the RDP accountant).

Not valid under fully adaptive composition (``adaptive_valid = False``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
from dp_accounting import privacy_accountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld import privacy_loss_mechanism as plm
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution as PLD

from . import progress
from .base import DeltaBelowFloorError, check_delta, check_epsilon, group_by_mechanism
from .grid import MAX_EXACT_MECHANISMS, GriddedComposition, check_max_exact
from .ledger import Event

MAX_INTERVAL = 1e-3
MIN_INTERVAL = 1e-8
RELATIVE_INTERVAL = 0.1
REPORT_MARGIN = 0.005
_ADD_OR_REMOVE = privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
DELTA_FLOOR_PER_BIN = 2.0**-52
"""Absolute delta slack per bin of the composed pmf (floating-point floor, module docstring)."""
DISCRETIZE_SECONDS_PER_BIN = 6e-6
"""Measured seconds per bin of a new one-step PLD (both directions) on the 2-core development
machine: 5.8 s for q=1e-6, sigma=0.3 (936,527 bins per direction).  For progress notices."""
COMPOSE_SECONDS_PER_BIN = 7e-7
"""Measured seconds per bin of a self-composed PLD: 2.6 s for 1000 steps of q=1e-6, sigma=0.3
(3.5M bins), 6.9 s for 10^6 steps of q=1, sigma=5 (10.4M bins).  For progress notices."""
COMPOSED_WIDTH = 52.0
"""Composed bins ~ one step's + ``COMPOSED_WIDTH sqrt(n) sd / h``, sd the one-step loss's
standard deviation (dp_accounting's Chernoff truncation at tail mass 1e-15; measured 14-52 over
q in [1e-3, 1], sigma in [0.15, 5], up to 10^6 steps; 142 for the heavy tail of q=1e-6,
sigma=0.3, whose discretization dominates).  For progress notices."""
_CACHE_SINGLES = 256  # one-step discretizations (small)
_CACHE_STEPS = 96  # self-composed mechanisms (more than MAX_EXACT_MECHANISMS)
_CACHE_PREFIXES = 8  # running compositions


def _lru_get(cache: OrderedDict, key: tuple):
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
    return hit


def _lru_put(cache: OrderedDict, key: tuple, value: object, size: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def delta_floor(pld: PLD) -> float:
    """Absolute delta slack of a composed PLD: :data:`DELTA_FLOOR_PER_BIN` times its bins."""
    bins = max(p.size for p in (pld._pmf_remove, pld._pmf_add))
    return DELTA_FLOOR_PER_BIN * bins


def _loss_at(q: float, t: float) -> float:
    """``log(1 - q + q e^t)``, stable for large ``|t|``."""
    if q == 1.0:
        return t
    if t > 700:
        return math.log(q) + t + math.log1p((1 - q) * math.exp(-t) / q)
    return math.log1p(q * math.expm1(t))


def rough_loss_bins(q: float, sigma: float, h: float) -> float:
    """A cheap (microseconds) upper estimate of :func:`loss_bins`: the loss range of x in
    ``[-11 sigma, 1 + 11 sigma]``, ``log(1 - q + q e^((x - 1/2) / sigma^2))`` at both ends,
    over ``h`` (measured 1.05-3.9x the exact count over q in [1e-7, 1], sigma in [0.1, 100])."""
    a = (11.0 * sigma + 0.5) / sigma**2
    return (_loss_at(q, a) - _loss_at(q, -a)) / h + 2


def loss_bins(q: float, sigma: float, h: float) -> int:
    """Bins of one direction of the one-step pessimistic PLD at interval ``h``, exactly as
    dp_accounting builds it: ``ceil(eps_upper / h) - floor(eps_lower / h) + 1`` from its
    connect-the-dots bounds (~0.6 ms; both directions have the same count)."""
    bounds = plm.GaussianPrivacyLoss(
        sigma, sampling_prob=q, adjacency_type=plm.AdjacencyType.REMOVE
    ).connect_dots_bounds()
    return math.ceil(bounds.epsilon_upper / h) - math.floor(bounds.epsilon_lower / h) + 1


def _loss_sd(pld: PLD) -> float:
    """Standard deviation of the privacy loss, the larger of the two directions' pmfs (0 for
    a pmf without a dense loss grid); sizes the self-composition for progress notices."""
    out = 0.0
    for pmf in (pld._pmf_remove, pld._pmf_add):
        probs = getattr(pmf, "_probs", None)
        if probs is None or len(probs) == 0:
            continue
        p = np.asarray(probs, dtype=float)
        total = p.sum()
        if not total > 0:
            continue
        k = np.arange(len(p), dtype=float)
        mean = float(p @ k) / total
        var = max(0.0, float(p @ (k - mean) ** 2) / total)
        out = max(out, math.sqrt(var) * pmf._discretization)
    return out


def step_loss_scale(q: float, sigma: float) -> float:
    """Approximate standard deviation of one step's privacy loss, ``q sqrt(expm1(1/sigma^2))``."""
    if math.isinf(sigma):
        return math.inf
    if sigma == 0 or 1.0 / sigma**2 > 700:
        return math.inf
    return q * math.sqrt(math.expm1(1.0 / sigma**2))


class PldAccountant(GriddedComposition):
    """Pessimistic PLD accounting (see the module docstring for the discretization rule)."""

    name = "pld"
    adaptive_valid = False

    def __init__(
        self,
        value_discretization_interval: float | None = None,
        max_exact_mechanisms: int | None = MAX_EXACT_MECHANISMS,
    ) -> None:
        if value_discretization_interval is not None and not (
            0 < value_discretization_interval < 1
        ):
            raise ValueError(
                f"value_discretization_interval must be in (0, 1), got "
                f"{value_discretization_interval!r}"
            )
        self.value_discretization_interval = value_discretization_interval
        self.max_exact_mechanisms = check_max_exact(max_exact_mechanisms)
        self._singles: OrderedDict[tuple, list] = OrderedDict()  # [PLD, loss sd or None]
        self._steps: OrderedDict[tuple, PLD] = OrderedDict()
        self._prefixes: OrderedDict[tuple, PLD] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"PldAccountant(value_discretization_interval={self.value_discretization_interval}, "
            f"max_exact_mechanisms={self.max_exact_mechanisms})"
        )

    @property
    def report_margin(self) -> float | None:
        """How far (relative) the reported epsilon may lie above the true one: 0.5%, 5x the
        ~0.1% measured for the default discretization rule (module docstring); None for an
        explicit interval, whose error is not known (the budget filter then checks exactly).
        The filter's dominance certificates stop this fraction below the budget
        (:mod:`accountants.budget`)."""
        return REPORT_MARGIN if self.value_discretization_interval is None else None

    def interval_for(self, mechanisms: Sequence[tuple[str, float, float]]) -> float:
        """The discretization interval used for a set of (kind, q, sigma) mechanisms."""
        if self.value_discretization_interval is not None:
            return self.value_discretization_interval
        scale = min((step_loss_scale(q, s) for _, q, s in mechanisms), default=math.inf)
        return min(MAX_INTERVAL, max(MIN_INTERVAL, RELATIVE_INTERVAL * scale))

    def _step_pld(self, q: float, sigma: float, n: int, h: float) -> PLD:
        """The pessimistic PLD of ``n`` steps of (q, sigma) at interval ``h`` (cached, with
        its one-step discretization: most of a composition's cost, and the same for every
        composition that shares the mechanism)."""
        key = (q, sigma, n, h)
        hit = _lru_get(self._steps, key)
        if hit is not None:
            return hit
        single = _lru_get(self._singles, (q, sigma, h))
        if single is None:
            bins = rough_loss_bins(q, sigma, h)  # microseconds; loose, but above the count
            if bins * DISCRETIZE_SECONDS_PER_BIN >= progress.SLOW_SECONDS:
                bins = loss_bins(q, sigma, h)  # maybe slow: count exactly (~1 ms)
            what = (
                f"pld accountant: discretizing q={q:g} sigma={sigma:g} on {int(bins):,} loss "
                f"bins (interval {h:.3g})"
            )
            with progress.slow_step(what, bins * DISCRETIZE_SECONDS_PER_BIN):
                one = pld_lib.from_gaussian_mechanism(
                    standard_deviation=sigma,
                    value_discretization_interval=h,
                    sampling_prob=q,
                    neighboring_relation=_ADD_OR_REMOVE,
                )
            single = [one, None]  # the loss spread: computed only for a maybe-slow composition
            _lru_put(self._singles, (q, sigma, h), single, _CACHE_SINGLES)
        one = single[0]
        bins = max(one._pmf_remove.size, one._pmf_add.size)
        composed = bins * n
        if composed * COMPOSE_SECONDS_PER_BIN >= progress.SLOW_SECONDS:
            if single[1] is None:
                single[1] = _loss_sd(one)
            composed = min(composed, bins + COMPOSED_WIDTH * math.sqrt(n) * single[1] / h)
        what = (
            f"pld accountant: composing {n:,} steps of q={q:g} sigma={sigma:g} "
            f"(~{int(composed):,} bins)"
        )
        with progress.slow_step(what, composed * COMPOSE_SECONDS_PER_BIN):
            out = one.self_compose(n)
        _lru_put(self._steps, key, out, _CACHE_STEPS)
        return out

    def _composed(self, events: Sequence[Event]) -> PLD | float | None:
        """The composed PLD of the costly events; None if none costs anything; ``math.inf``
        if one has sigma = 0.  The same left fold, identity first, as dp_accounting's
        ``PLDAccountant`` over ``ComposedDpEvent`` (so the same numbers), with the running
        composition of the leading mechanisms cached: compositions that differ only in their
        last mechanisms (the budget filter's probes, a ledger growing by its last entry)
        reuse it."""
        counts = group_by_mechanism(self.composed_events(events))
        counts = {k: n for k, n in counts.items() if not math.isinf(k[2])}  # sigma=inf: free
        if not counts:
            return None
        if any(k[2] == 0 for k in counts):
            return math.inf
        h = self.interval_for(list(counts))
        items = [(q, sigma, n) for (_, q, sigma), n in counts.items()]
        start, pld = 0, None
        for m in range(len(items), 0, -1):  # the longest cached leading composition
            pld = _lru_get(self._prefixes, (h, tuple(items[:m])))
            if pld is not None:
                start = m
                break
        if pld is None:
            pld = pld_lib.identity(value_discretization_interval=h)
        for m in range(start, len(items)):
            pld = pld.compose(self._step_pld(*items[m], h))
            if m + 1 >= len(items) - 1:  # keep the last two: all, and all but the last
                _lru_put(self._prefixes, (h, tuple(items[: m + 1])), pld, _CACHE_PREFIXES)
        return pld

    def epsilon(self, events: Sequence[Event], delta: float) -> float:
        delta = check_delta(delta)
        pld = self._composed(events)
        if pld is None:
            return 0.0
        if isinstance(pld, float):
            return pld
        floor = delta_floor(pld)
        if delta <= floor:
            raise DeltaBelowFloorError(
                f"delta {delta:g} is at or below the floating-point floor {floor:.3g} of this "
                "PLD composition; use a larger delta or the 'rdp' accountant"
            )
        return max(0.0, float(pld.get_epsilon_for_delta(delta - floor)))

    def delta(self, events: Sequence[Event], epsilon: float) -> float:
        epsilon = check_epsilon(epsilon)
        pld = self._composed(events)
        if pld is None:
            return 0.0
        if isinstance(pld, float):
            return 1.0
        return min(1.0, max(0.0, float(pld.get_delta_for_epsilon(epsilon))) + delta_floor(pld))

    def profile(self, events: Sequence[Event]) -> Callable[[Sequence[float]], np.ndarray]:
        """The privacy profile ``epsilons -> delta(epsilon)`` of ``events`` (composed once):
        upper bounds, the worse of the add and remove directions, for epsilons >= 0.  Each
        direction's ``delta(eps) = m_inf + sum_{l > eps} p_l (1 - e^(eps - l))`` is evaluated
        from its discrete loss pmf by suffix sums (one pass for all epsilons)."""
        pld = self._composed(events)
        if isinstance(pld, float):  # sigma = 0: no privacy at any epsilon
            return lambda epsilons: np.ones(len(np.asarray(epsilons, dtype=float)))
        pmfs = [] if pld is None else [pld._pmf_remove, pld._pmf_add]
        floor = 0.0 if pld is None else delta_floor(pld)
        tables = [_suffix_table(p.to_dense_pmf()) for p in pmfs]

        def deltas(epsilons: Sequence[float]) -> np.ndarray:
            eps = np.asarray(epsilons, dtype=float)
            if eps.ndim != 1 or np.any(~np.isfinite(eps)) or np.any(eps < 0):
                raise ValueError("epsilons must be a 1-d array of finite values >= 0")
            out = np.zeros_like(eps)
            for losses, upper, lower_log in tables:
                k = np.searchsorted(losses, eps, side="right")  # first loss > eps
                with np.errstate(divide="ignore"):
                    d = upper[k] - np.exp(np.minimum(eps + lower_log[k], 700.0))
                out = np.maximum(out, d)
            return np.clip(out + floor if tables else out, 0.0, 1.0)

        return deltas


def _suffix_table(pmf) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loss grid of a dense PLD pmf and, from each index on, ``m_inf + sum p`` and
    ``log sum p e^-l`` (so the profile is ``upper - e^(eps + lower_log)``)."""
    probs = np.asarray(pmf._probs, dtype=float)
    losses = (np.arange(len(probs)) + pmf._lower_loss) * pmf._discretization
    upper = np.append(np.cumsum(probs[::-1])[::-1], 0.0) + pmf._infinity_mass
    with np.errstate(divide="ignore"):
        terms = np.log(np.where(probs > 0, probs, 0.0)) - losses
    lower_log = np.append(np.logaddexp.accumulate(terms[::-1])[::-1], -np.inf)
    return losses, upper, lower_log
