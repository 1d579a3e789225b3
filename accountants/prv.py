"""Privacy-random-variable accountant, backed by ``prv_accountant.PRVAccountant``.

The PRV accountant (Gopi, Lee & Wutschitz 2021) discretizes each mechanism's privacy random
variable on a grid of mesh ``m`` over ``[-L, L]`` and composes by FFT.  Its Theorem 5.5 gives
*bounds*: ``epsilon_true in [lower, upper]`` with ``upper = estimate(delta - delta_err) +
eps_err``.  We always report ``upper`` (never the estimate).

Error parameters:

* ``eps_err = 2.5e-3 * epsilon_scale`` where ``epsilon_scale`` is the RDP epsilon of the same
  composition (an upper bound, so typically 5-30% above the truth), giving ``upper`` within
  ~0.3-0.5% of the true epsilon;  ``delta_err = 1e-3 * delta``.
* The library sets ``m = eps_err / sqrt(N/2 * log(12/delta_err))`` (N = total compositions) and
  ``L`` from an RDP tail bound.  If that grid would exceed :data:`MAX_GRID_POINTS` (huge step
  counts, tiny epsilon) ``eps_err`` is raised until it fits: the bound gets looser, never
  invalid.
* Step counts are rounded up to powers of two for choosing the grid (``max_self_compositions``),
  and grids are cached, so nearby step counts share one discretization: this makes the bound
  monotone in the step count in practice and the budget filter's search cheap.

Limits: ``q == 1`` uses the library's exact ``GaussianMechanism`` PRV; ``sigma = inf`` events
cost nothing and are dropped; ``sigma = 0`` gives ``inf``.  Whenever the library fails (e.g.
floating-point limits for tiny delta, a discretization it rejects) or returns a non-finite bound,
the accountant warns (:class:`PrvFallbackWarning`) and returns the pessimistic PLD bound
instead, which is also a valid upper bound: it never silently under-reports.

Not valid under fully adaptive composition (``adaptive_valid = False``).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant
from prv_accountant.accountant import compute_safe_domain_size
from scipy.fft import next_fast_len

from .base import check_delta, check_epsilon, check_events, group_by_mechanism
from .ledger import Event
from .pld import PldAccountant

EPS_ERROR_REL = 2.5e-3
EPS_ERROR_MIN = 1e-7
DELTA_ERROR_REL = 1e-3
MAX_GRID_POINTS = 2**21
_CACHE_SIZE = 4


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


class PrvAccountant:
    """PRV accounting reporting the upper bound (see the module docstring)."""

    name = "prv"
    adaptive_valid = False

    def __init__(
        self,
        eps_error_rel: float = EPS_ERROR_REL,
        delta_error_rel: float = DELTA_ERROR_REL,
        max_grid_points: int = MAX_GRID_POINTS,
    ) -> None:
        if not (0 < eps_error_rel < 1) or not (0 < delta_error_rel < 1):
            raise ValueError("eps_error_rel and delta_error_rel must be in (0, 1)")
        if max_grid_points < 1000:
            raise ValueError("max_grid_points must be >= 1000")
        self.eps_error_rel = eps_error_rel
        self.delta_error_rel = delta_error_rel
        self.max_grid_points = max_grid_points
        self._pld = PldAccountant()
        self._cache: OrderedDict[tuple, PRVAccountant] = OrderedDict()

    def __repr__(self) -> str:
        return f"PrvAccountant(eps_error_rel={self.eps_error_rel})"

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
        return max(0.0, float(lower)), max(0.0, float(upper))

    # -- the accountant interface --------------------------------------------------------------

    def epsilon(self, events: Sequence[Event], delta: float) -> float:
        """Upper bound on epsilon at ``delta`` (PRV Theorem 5.5)."""
        delta = check_delta(delta)
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
        """(lower, upper) bounds on epsilon from the PRV library (no fallback: raises)."""
        delta = check_delta(delta)
        counts, infinite = self._split(events)
        if infinite:
            return math.inf, math.inf
        if not counts:
            return 0.0, 0.0
        return self._bounds(counts, delta)

    def delta(self, events: Sequence[Event], epsilon: float) -> float:
        """Upper bound on delta at ``epsilon``: ``delta_est(epsilon - eps_err) + delta_err``."""
        epsilon = check_epsilon(epsilon)
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
            return min(1.0, max(0.0, float(upper)))
        except _LIBRARY_ERRORS as err:
            self._fallback(err, "delta")
            return self._pld.delta(events, epsilon)
