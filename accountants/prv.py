"""Privacy-random-variable accountant, backed by ``prv_accountant.PRVAccountant``.

The PRV accountant (Gopi, Lee & Wutschitz 2021) discretizes each mechanism's privacy random
variable on a grid of mesh ``m`` over ``[-L, L]`` and composes by FFT.  Its Theorem 5.5 gives
*bounds*: ``epsilon_true in [lower, upper]`` with ``upper = estimate(delta - delta_err) +
eps_err``.  We always report ``upper`` (never the estimate).

Error parameters:

* ``eps_err = 2.5e-3 * epsilon_scale`` where ``epsilon_scale`` is the pessimistic-PLD epsilon
  of the same composition with step counts rounded up (below), giving ``upper`` about 0.25-0.45%
  above the true epsilon; ``delta_err = 1e-3 * delta`` (for ``delta()``: ``eps_err = 2.5e-3 *
  epsilon`` and ``delta_err = 1e-3 *`` the PLD delta).
* The library sets ``m = eps_err / sqrt(N/2 * log(12/delta_err))`` (N = total compositions) and
  ``L`` from an RDP tail bound.  If that grid would exceed :data:`MAX_GRID_POINTS` (huge step
  counts, tiny epsilon) ``eps_err`` is raised until it fits: the bound gets looser, never
  invalid.
* Step counts are rounded up to powers of two for choosing the grid (``max_self_compositions``),
  and grids are cached, so nearby step counts share one discretization: this makes the bound
  monotone in the step count in practice and the budget filter's search cheap.

Correctness safeguards (prv-accountant 0.2.0 can silently return an "upper bound" far below
the truth):

* The library centres each discretized PRV on a continuous mean that it integrates with fixed
  breakpoints over the whole domain; for wide domains (many steps) that mean is off by ~1e-4
  per step, an error multiplied by the number of steps (q=0.01, sigma=1, 3e6 steps: bound 123
  for a true epsilon of ~347).  We recompute the mean accurately and re-centre (:func:`_recentre`).
* Every result is checked against the pessimistic PLD (:mod:`accountants.pld`, an independent
  upper bound within ~0.1% of the truth): a PRV bound more than :data:`GUARD_TOLERANCE` (0.5%)
  below it is treated as a library failure.
* On any library failure (the check above, floating-point limits for tiny delta, a
  discretization it rejects, non-finite output) the accountant warns
  (:class:`PrvFallbackWarning`) and returns the pessimistic PLD bound instead.  So a reported
  value is never silently more than 0.5% below an independent valid upper bound.

Limits: ``q == 1`` uses the library's exact ``GaussianMechanism`` PRV; ``sigma = inf`` events
cost nothing and are dropped; ``sigma = 0`` gives ``inf``.  For epsilon below ~0.05 the
additive error makes the bound several percent loose (use the PLD accountant there).

Many distinct mechanisms: a ledger with more than ``max_exact_mechanisms`` (default
:data:`MAX_EXACT_MECHANISMS_PRV` = 16) distinct costly mechanisms is composed on the public
grid of :mod:`accountants.grid` (an upper bound, reported as such:
:meth:`PrvAccountant.grid_level`), as by the PLD accountant; the PLD guard and fallback then
compose the same gridded events.  The default is lower than PLD's 64 because every distinct
mechanism carries its own full-size grid here (up to ``max_grid_points`` nodes and its FFT
buffers): 46 mechanisms of a decaying schedule held 7 GB and had not finished one filter
query in 6 minutes (benchmarks/README.md).  So a PRV ledger of many distinct noise levels
composes on a coarser grid than PLD's (sigma 2 -> 1: level 2, 12 points): prefer ``pld``
for such schedules.

Not valid under fully adaptive composition (``adaptive_valid = False``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant
from prv_accountant.accountant import compute_safe_domain_size
from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated
from scipy import integrate
from scipy.fft import next_fast_len

from .base import check_delta, check_epsilon, check_events, group_by_mechanism
from .grid import GriddedComposition, check_max_exact
from .ledger import Event
from .pld import PldAccountant

EPS_ERROR_REL = 2.5e-3
EPS_ERROR_MIN = 1e-7
DELTA_ERROR_REL = 1e-3
MAX_GRID_POINTS = 2**21
GUARD_TOLERANCE = 0.005
_CACHE_SIZE = 4
MAX_EXACT_MECHANISMS_PRV = 16
"""Default ``max_exact_mechanisms`` (see the module docstring)."""


_LIBRARY_ERRORS = (ArithmeticError, ValueError, RuntimeError, AssertionError, MemoryError)


class PrvFallbackWarning(RuntimeWarning):
    """The PRV library could not bound this composition; a PLD upper bound was reported."""


def _bucket(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


def _mesh(buckets: list[int], eps_err: float, d_err: float) -> float:
    """The library's mesh size (Theorem 5.5 of Gopi et al.)."""
    return eps_err / np.sqrt(sum(buckets) / 2 * np.log(12 / d_err))


def _fft_friendly_half_width(prvs: list, buckets: list[int], eps_err: float, d_err: float) -> float:
    """The library's safe domain half-width L, enlarged so that the grid has 2K nodes with K
    5-smooth: pocketfft on sizes with large prime factors is many times slower.  A larger
    domain only moves the truncation further out, so the bound stays valid."""
    half_width = compute_safe_domain_size(prvs, buckets, eps_err, d_err)
    if not math.isfinite(half_width):
        raise FloatingPointError("PRV domain size is not finite")
    mesh = _mesh(buckets, eps_err, d_err)
    k = next_fast_len(math.ceil(half_width / mesh) + 1)
    while (k - 1 - 1e-6) * mesh < half_width:
        k = next_fast_len(k + 1)
    return (k - 1 - 1e-6) * mesh


def _truncated_mean(prv: object, t_min: float, t_max: float) -> float:
    """Mean of ``prv`` truncated to [t_min, t_max], as E[Y] = int_0 (1 - F) - int^0 F with
    quadrature split at +-10^k, so that the narrow bulk of a small per-step loss is resolved
    however wide the domain is."""
    tprv = PrivacyRandomVariableTruncated(prv, t_min, t_max)

    def cdf(t: float) -> float:
        return float(tprv.cdf(np.longdouble(t)))

    def quad(f, a: float, b: float) -> float:
        return integrate.quad(f, a, b, limit=200, epsabs=1e-15, epsrel=1e-12)[0]

    scales = [10.0**k for k in range(-9, 5)]
    up = [0.0, *[x for x in scales if x < t_max], t_max]
    down = [t_min, *[-x for x in reversed(scales) if -x > t_min], 0.0]
    positive = sum(quad(lambda t: 1.0 - cdf(t), a, b) for a, b in itertools.pairwise(up))
    negative = sum(quad(cdf, a, b) for a, b in itertools.pairwise(down))
    return positive - negative


def _recentre(acc: PRVAccountant, prvs: list) -> None:
    """Re-centre each discretized PRV on its accurately computed mean.

    prv-accountant 0.2.0 shifts the discretization so that its mean equals a continuous mean
    that it integrates by parts over the whole domain with fixed breakpoints; for wide domains
    (many compositions) that mean can be off by ~1e-4 per step while passing the library's own
    check, and the error is multiplied by the number of compositions.  Example: q=0.01,
    sigma=1, 3e6 steps, delta=1e-5 gives an "upper bound" of 123 where the truth is ~347.  The
    Theorem 5.5 bound needs the exact mean, so we replace it (same check: within dt/2 of the
    raw discrete mean)."""
    composer = acc.composer
    for prv, dprv, single in zip(prvs, composer.prvs, composer.self_composers, strict=True):
        shift = float(dprv.domain.shifts())
        t_min, t_max = dprv.domain.t_min() - shift, dprv.domain.t_max() - shift
        target = _truncated_mean(prv, float(t_min), float(t_max))
        current = float(np.dot(dprv.domain.ts(), dprv.pmf))
        if not abs(target - (current - shift)) < dprv.domain.dt() / 2:
            raise RuntimeError("discrete mean differs from the continuous mean by over dt/2")
        dprv.domain = dprv.domain.shift_right(target - current)
        single.domain = dprv.domain


class PrvAccountant(GriddedComposition):
    """PRV accounting reporting the upper bound (see the module docstring)."""

    name = "prv"
    adaptive_valid = False

    def __init__(
        self,
        eps_error_rel: float = EPS_ERROR_REL,
        delta_error_rel: float = DELTA_ERROR_REL,
        max_grid_points: int = MAX_GRID_POINTS,
        max_exact_mechanisms: int | None = MAX_EXACT_MECHANISMS_PRV,
    ) -> None:
        if not (0 < eps_error_rel < 1) or not (0 < delta_error_rel < 1):
            raise ValueError("eps_error_rel and delta_error_rel must be in (0, 1)")
        if max_grid_points < 1000:
            raise ValueError("max_grid_points must be >= 1000")
        self.eps_error_rel = eps_error_rel
        self.delta_error_rel = delta_error_rel
        self.max_grid_points = max_grid_points
        self.max_exact_mechanisms = check_max_exact(max_exact_mechanisms)
        self._pld = PldAccountant(max_exact_mechanisms=None)  # given the events we compose
        self._cache: OrderedDict[tuple, PRVAccountant] = OrderedDict()

    def __repr__(self) -> str:
        return f"PrvAccountant(eps_error_rel={self.eps_error_rel})"

    @property
    def report_margin(self) -> float:
        """How far (relative) the reported upper bound may lie above the true epsilon: the
        library's ``upper - lower`` is ``2 eps_err`` plus the delta_err shift, and ``eps_err``
        is ``eps_error_rel`` times the epsilon of step counts rounded up to powers of two (at
        most about twice the epsilon), so ``4 eps_error_rel + 2 delta_error_rel`` (1.2% by
        default; measured widths 0.5-0.7%).  Not covered: a composition whose grid hits
        ``max_grid_points`` (``eps_err`` is raised there, see the module docstring).  The budget
        filter's dominance certificates stop this fraction below the budget
        (:mod:`accountants.budget`)."""
        return 4 * self.eps_error_rel + 2 * self.delta_error_rel

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _prvs(mechanisms: Sequence[tuple[str, float, float]]) -> list:
        return [
            GaussianMechanism(noise_multiplier=s)
            if q == 1.0
            else PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
            for _, q, s in mechanisms
        ]

    def _grid_eps_error(
        self, prvs: list, buckets: list[int], eps_err: float, d_err: float
    ) -> float:
        """Raise ``eps_err`` until the library's grid has at most ``max_grid_points`` nodes."""
        for _ in range(8):
            half_width = compute_safe_domain_size(prvs, buckets, eps_err, d_err)
            if not math.isfinite(half_width):
                raise FloatingPointError("PRV domain size is not finite")
            points = 2 * half_width / _mesh(buckets, eps_err, d_err)
            if points <= self.max_grid_points:
                return eps_err
            eps_err *= 1.05 * points / self.max_grid_points
        return eps_err

    def _grid(
        self, counts: dict[tuple[str, float, float], int], *, delta: float | None = None,
        epsilon: float | None = None,
    ) -> tuple[PRVAccountant, list[int]]:  # fmt: skip
        """A discretized composer covering ``counts`` (cached per power-of-two bucket), and the
        per-mechanism step counts to compose.  Error parameters come from the pessimistic PLD
        of the bucketed composition: eps_err = rel * epsilon (given delta) or delta_err = rel *
        delta (given epsilon)."""
        mechanisms = tuple(counts)
        n = [counts[m] for m in mechanisms]
        buckets = [_bucket(c) for c in n]
        key = (mechanisms, tuple(buckets), delta, epsilon)
        acc = self._cache.get(key)
        if acc is not None:
            self._cache.move_to_end(key)
            return acc, n
        bucketed = [Event(q, s, b) for (_, q, s), b in zip(mechanisms, buckets, strict=True)]
        if delta is not None:
            scale = self._pld.epsilon(bucketed, delta)
            if not math.isfinite(scale):
                raise FloatingPointError("epsilon of the composition is infinite")
            eps_err, d_err = self.eps_error_rel * scale, self.delta_error_rel * delta
        else:
            assert epsilon is not None
            eps_err = self.eps_error_rel * epsilon
            d_err = self.delta_error_rel * self._pld.delta(bucketed, epsilon)
        eps_err, d_err = max(EPS_ERROR_MIN, eps_err), max(1e-300, d_err)
        prvs = self._prvs(mechanisms)
        eps_err = self._grid_eps_error(prvs, buckets, eps_err, d_err)
        half_width = _fft_friendly_half_width(prvs, buckets, eps_err, d_err)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eps_max warning; overflow inside the library
            acc = PRVAccountant(
                prvs=prvs,
                eps_error=eps_err,
                delta_error=d_err,
                max_self_compositions=buckets,
                eps_max=half_width,
            )
        with np.errstate(over="ignore"):  # the library's cdf: exp(t) -> inf, cdf -> 1
            _recentre(acc, prvs)
        self._cache[key] = acc
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return acc, n

    def _split(self, events: Sequence[Event]) -> tuple[dict, bool]:
        counts = group_by_mechanism(check_events(events, self.name))
        if any(k[2] == 0 for k in counts):
            return {}, True
        return {k: n for k, n in counts.items() if not math.isinf(k[2])}, False

    def _fallback(self, err: BaseException, what: str) -> None:
        warnings.warn(
            f"PRV accountant could not bound this composition ({type(err).__name__}: {err}); "
            f"reporting the pessimistic PLD {what} instead (also a valid upper bound)",
            PrvFallbackWarning,
            stacklevel=3,
        )

    def _bounds(self, counts: dict, delta: float) -> tuple[float, float]:
        acc, n = self._grid(counts, delta=delta)
        with np.errstate(all="ignore"):
            lower, _, upper = acc.compute_epsilon(delta=delta, num_self_compositions=n)
        if not (math.isfinite(upper) and upper >= lower):
            raise FloatingPointError(f"PRV returned bounds ({lower}, {upper})")
        # Guard against silent failures of the library: its upper bound is ~0.25-0.45% above
        # the truth and the pessimistic PLD (itself an upper bound) within ~0.1%, so an "upper
        # bound" more than GUARD_TOLERANCE below the PLD means the PRV computation went wrong.
        events = [Event(q, s, c) for (_, q, s), c in counts.items()]
        reference = self._pld.epsilon(events, delta)
        if upper < reference * (1 - GUARD_TOLERANCE):
            raise ArithmeticError(
                f"PRV upper bound {upper:.6g} is more than {GUARD_TOLERANCE:.0%} below the "
                f"pessimistic PLD {reference:.6g}"
            )
        return max(0.0, float(lower)), max(0.0, float(upper))

    # -- the accountant interface --------------------------------------------------------------

    def epsilon(self, events: Sequence[Event], delta: float) -> float:
        """Upper bound on epsilon at ``delta`` (PRV Theorem 5.5)."""
        delta = check_delta(delta)
        events = self.composed_events(events)
        counts, infinite = self._split(events)
        if infinite:
            return math.inf
        if not counts:
            return 0.0
        try:
            return self._bounds(counts, delta)[1]
        except _LIBRARY_ERRORS as err:
            self._fallback(err, "epsilon")
            return self._pld.epsilon(events, delta)

    def epsilon_bounds(self, events: Sequence[Event], delta: float) -> tuple[float, float]:
        """(lower, upper) bounds on epsilon from the PRV library (no fallback: raises); of
        the gridded events where the ledger is compressed."""
        delta = check_delta(delta)
        events = self.composed_events(events)
        counts, infinite = self._split(events)
        if infinite:
            return math.inf, math.inf
        if not counts:
            return 0.0, 0.0
        return self._bounds(counts, delta)

    def delta(self, events: Sequence[Event], epsilon: float) -> float:
        """Upper bound on delta at ``epsilon``: ``delta_est(epsilon - eps_err) + delta_err``."""
        epsilon = check_epsilon(epsilon)
        events = self.composed_events(events)
        counts, infinite = self._split(events)
        if infinite:
            return 1.0
        if not counts or math.isinf(epsilon):
            return 0.0
        try:
            acc, n = self._grid(counts, epsilon=epsilon)
            with np.errstate(all="ignore"):
                _, _, upper = acc.compute_delta(epsilon=epsilon, num_self_compositions=n)
            if not math.isfinite(upper):
                raise FloatingPointError(f"PRV returned delta bound {upper}")
            events = [Event(q, s, c) for (_, q, s), c in counts.items()]
            reference = self._pld.delta(events, epsilon)
            if upper < reference * (1 - GUARD_TOLERANCE):
                raise ArithmeticError(
                    f"PRV delta bound {upper:.6g} is more than {GUARD_TOLERANCE:.0%} below the "
                    f"pessimistic PLD {reference:.6g}"
                )
            return min(1.0, max(0.0, float(upper)))
        except _LIBRARY_ERRORS as err:
            self._fallback(err, "delta")
            return self._pld.delta(events, epsilon)
