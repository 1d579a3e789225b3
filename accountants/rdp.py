"""Rényi-DP accountant, equal to ``dp_accounting.rdp``.

Per step, the Poisson-subsampled Gaussian mechanism with rate q and noise multiplier sigma is
``(alpha, r_alpha(q, sigma))``-RDP for every order alpha (Mironov, Talwar & Zhang 2019; the
series ``dp_accounting`` uses, vectorized over orders in :mod:`accountants.sgm_rdp`: a new
sigma costs milliseconds, not dp_accounting's 0.2-0.9 s of Python loops).  RDP composes
additively per order, so a ledger has the RDP curve

    R_alpha = sum_i steps_i * r_alpha(q_i, sigma_i),

accumulated left to right over the merged events exactly as ``dp_accounting.rdp.RdpAccountant``
does with ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``.

Conversion to (epsilon, delta) (the one ``dp_accounting.rdp.compute_epsilon`` uses):

    epsilon(delta) = max(0, min_alpha [R_alpha + log(1 - 1/alpha) - log(delta * alpha) / (alpha - 1)])

(Canonne, Kamath & Steinke 2020, Prop. 12), where an order also certifies epsilon = 0 when
``sqrt(1 - exp(-R_alpha)) <= delta`` (total variation bound via KL <= R_alpha).

Orders (:data:`RDP_ORDERS`, 206 of them): 1.05..1.95 step 0.05, 2..11.9 step 0.1, 12..31.5
step 0.5, 32..64 step 1, then 72..1024.  This is finer than ``dp_accounting``'s default near the
optimum of typical DP-SGD runs (alpha ~ 2..64) and reaches alpha = 1024 for epsilon << 1.

Fully adaptive composition (:attr:`RdpAccountant.adaptive_valid` is True).  When the
parameters of step t may depend on the outputs of earlier steps, RDP still composes *per fixed
order*: with L_t the privacy loss of the transcript and R_t^alpha the (predictable) running RDP
sum, ``exp((alpha - 1) (L_t - R_t^alpha))`` is a supermartingale (Feldman & Zrnic 2021, RDP
filter; Lécuyer 2021).  The Prop. 12 conversion is a pointwise bound
``(1 - e^(eps - L))_+ <= K_alpha e^((alpha-1)(L - eps))``, so it survives optional stopping.
Taking the *minimum over orders after the fact* is a data-dependent choice of order, though,
and that is only covered by a union bound over the order set: a filter that continues while
some order alpha in Lambda has R^alpha within the Prop. 12 budget at delta / |Lambda| is
(epsilon, delta)-DP.  :meth:`RdpAccountant.adaptive_epsilon` implements exactly that, over the
coarser order set :data:`ADAPTIVE_ORDERS` (|Lambda| = 25, so the union bound costs
log(25) / (alpha - 1) in epsilon), and without the KL shortcut (not a pointwise bound).
``epsilon`` (non-adaptive) is the right number when the schedule of (q, sigma) does not depend
on private data; use ``adaptive_epsilon`` / ``BudgetFilter(..., adaptive=True)`` when it does.

Long ledgers.  :meth:`RdpAccountant.ledger_rdp` keeps, per :class:`~accountants.Ledger`, the
curve of its entries but the last, extended as the ledger grows (a ledger only appends, or
adds steps to its last entry), so the curve of step ``10^4`` of a run whose noise changes
every step costs one per-step curve and one vector addition, not ``10^4``; the sum runs in
the same order as :meth:`RdpAccountant.rdp`, so the result is bitwise the same.

Event kinds.  Besides ``poisson_gaussian``, any kind whose per-step RDP curve is known can be
accounted: :func:`register_rdp_kind` maps a kind to ``(event, orders) -> per-step RDP`` (an
upper bound at every order).  :mod:`accountants.error_feedback` registers ``error_feedback``.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from .base import check_delta, check_epsilon, check_events, merge_consecutive
from .ledger import POISSON_GAUSSIAN, Event, Ledger
from .sgm_rdp import subsampled_gaussian_rdp

RDP_ORDERS: tuple[float, ...] = tuple(
    [round(1 + k / 20, 10) for k in range(1, 20)]
    + [round(2 + k / 10, 10) for k in range(100)]
    + [round(12 + k / 2, 10) for k in range(40)]
    + [float(a) for a in range(32, 65)]
    + [72.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0, 256.0, 320.0, 384.0, 512.0, 640.0]
    + [768.0, 1024.0]
)
"""The fixed order grid of the non-adaptive conversion."""

ADAPTIVE_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 16.0,
    20.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
)  # fmt: skip
"""Orders of the adaptive (union-bound) conversion; fewer orders = smaller union-bound cost."""


@functools.lru_cache(maxsize=4096)
def _step_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at each order (read-only array): the series
    ``dp_accounting`` computes, vectorized (:mod:`accountants.sgm_rdp`; equal up to rounding, or
    larger where dp_accounting truncates early; ``inf`` where it excludes an order)."""
    out = subsampled_gaussian_rdp(q, sigma, orders)
    out.setflags(write=False)
    return out


StepRdp = Callable[[Event, tuple[float, ...]], np.ndarray]

_KINDS: dict[str, StepRdp] = {
    POISSON_GAUSSIAN: lambda e, orders: _step_rdp(e.sample_rate, e.noise_multiplier, orders)
}


def register_rdp_kind(kind: str, step_rdp: StepRdp) -> None:
    """Let the RDP accountant compose events of ``kind``: ``step_rdp(event, orders)`` must return
    an upper bound on one step's RDP at each order (valid for both neighbouring directions)."""
    _KINDS[kind] = step_rdp


def rdp_kinds() -> tuple[str, ...]:
    """The event kinds the RDP accountant supports."""
    return tuple(_KINDS)


@functools.lru_cache(maxsize=64)
def _conversion_constants(
    orders: tuple[float, ...], delta: float
) -> tuple[np.ndarray, np.ndarray, float]:
    a = np.asarray(orders, dtype=np.float64)
    c = np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1.0)
    usable = a > 1.01
    kl_threshold = -math.log1p(-(delta**2))  # R < this  <=>  delta^2 + expm1(-R) > 0
    return c, usable, kl_threshold


def epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, delta: float) -> float:
    """Smallest epsilon certified at ``delta`` by the RDP curve ``rdp`` over ``orders``.

    Vectorized mirror of ``dp_accounting.rdp.compute_epsilon``: per order
    ``R + log1p(-1/a) - log(delta a)/(a - 1)`` (a > 1.01), or 0 when
    ``delta^2 + expm1(-R) > 0``; the minimum over orders, floored at 0."""
    c, usable, _ = _conversion_constants(tuple(orders), float(delta))
    r = np.asarray(rdp, dtype=np.float64)
    r = np.where(np.isnan(r), np.inf, np.maximum(r, 0.0))  # RDP >= 0; NaN treated as unbounded
    with np.errstate(over="ignore", invalid="ignore"):
        kl_zero = (delta**2 + np.expm1(-r)) > 0
        eps = np.where(kl_zero, 0.0, np.where(usable, r + c, np.inf))
    return max(0.0, float(eps.min()))


def conversion_floor(orders: Sequence[float], delta: float) -> tuple[float, float]:
    """``(epsilon, order)``: the least epsilon the Prop. 12 conversion certifies at ``delta``
    however small the RDP curve, ``min_a [log1p(-1/a) - log(delta a) / (a - 1)]`` over the
    usable orders (a > 1.01), floored at 0, and the order attaining it.  No noise lowers it:
    below it only the KL shortcut certifies anything (epsilon 0, once the whole curve is under
    ``-log1p(-delta^2)``).  Use ``delta / len(orders)`` for the adaptive conversion."""
    c, usable, _ = _conversion_constants(tuple(float(a) for a in orders), float(delta))
    c = np.where(usable, c, np.inf)
    i = int(np.argmin(c))
    return max(0.0, float(c[i])), float(orders[i])


def delta_for_floor(orders: Sequence[float], epsilon: float) -> float:
    """The least delta at which :func:`conversion_floor` is at most ``epsilon``:
    ``min_a exp(-(a - 1) (epsilon - log1p(-1/a))) / a`` over the usable orders (capped at 1)."""
    a = np.asarray([x for x in orders if x > 1.01], dtype=np.float64)
    if a.size == 0:
        return 1.0
    with np.errstate(over="ignore"):
        d = np.exp(-(a - 1.0) * (epsilon - np.log1p(-1.0 / a))) / a
    return min(1.0, float(d.min()))


def delta_from_rdp(orders: Sequence[float], rdp: np.ndarray, epsilon: float) -> float:
    """Smallest delta certified at ``epsilon`` (mirror of ``dp_accounting.rdp.compute_delta``):
    per order ``min(0.5 log1p(-e^-R), (a-1)(R - eps + log1p(-1/a)) - log a)`` in log space."""
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    r = np.where(np.isnan(r), np.inf, np.maximum(r, 0.0))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_kl = np.where(r <= 0, -np.inf, 0.5 * np.log1p(-np.exp(-r)))
        bound = (a - 1.0) * (r - epsilon + np.log1p(-1.0 / a)) - np.log(a)
        logd = np.where(a > 1.01, np.minimum(log_kl, bound), log_kl)
    return min(math.exp(float(logd.min())), 1.0)


def adaptive_epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, delta: float) -> float:
    """Epsilon valid under fully adaptive composition (filter semantics): Prop. 12 at
    ``delta / len(orders)`` per order (union bound over the orders), minimum over orders."""
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    r = np.where(np.isnan(r), np.inf, np.maximum(r, 0.0))
    d = delta / len(a)
    with np.errstate(over="ignore", invalid="ignore"):
        eps = np.where(a > 1.01, r + np.log1p(-1.0 / a) - np.log(d * a) / (a - 1.0), np.inf)
    return max(0.0, float(eps.min()))


class RdpAccountant:
    """RDP accounting over :data:`RDP_ORDERS` (see the module docstring for the math)."""

    name = "rdp"
    adaptive_valid = True

    def __init__(
        self,
        orders: Sequence[float] = RDP_ORDERS,
        adaptive_orders: Sequence[float] = ADAPTIVE_ORDERS,
    ) -> None:
        for label, grid in (("orders", orders), ("adaptive_orders", adaptive_orders)):
            if not grid or any(not (float(a) > 1.0) or math.isinf(a) for a in grid):
                raise ValueError(f"{label} must be a non-empty list of finite orders > 1")
        self.orders = tuple(float(a) for a in orders)
        self.adaptive_orders = tuple(float(a) for a in adaptive_orders)
        # per ledger and grid: (entries summed, their curve); see ledger_rdp
        self._closed: dict[int, tuple[weakref.ref, dict[bool, tuple[int, np.ndarray]]]] = {}

    def __repr__(self) -> str:
        return f"RdpAccountant({len(self.orders)} orders)"

    # -- curves ------------------------------------------------------------------------------

    def step_rdp(self, event: Event, *, adaptive: bool = False) -> np.ndarray:
        """RDP of one step of ``event`` at each order."""
        orders = self.adaptive_orders if adaptive else self.orders
        return _KINDS[event.kind](event, orders)

    def rdp(self, events: Sequence[Event], *, adaptive: bool = False) -> np.ndarray:
        """The RDP curve ``sum_i steps_i r(q_i, sigma_i)`` of the merged events, left to right."""
        events = merge_consecutive(check_events(events, self.name, _KINDS))
        orders = self.adaptive_orders if adaptive else self.orders
        total = np.zeros(len(orders))
        for e in events:
            total = total + e.steps * self.step_rdp(e, adaptive=adaptive)
        return total

    def ledger_rdp(
        self, ledger: Ledger, n: int | None = None, *, adaptive: bool = False
    ) -> np.ndarray:
        """The RDP curve of ``ledger``'s first ``n`` entries (default: all), bitwise equal to
        ``rdp(ledger.events[:n])``, in time independent of the ledger's length once the
        entries before the last have been summed (they never change)."""
        entries = ledger._events  # read-only use; append-only, see Ledger
        n = len(entries) if n is None else n
        closed = max(len(entries) - 1, 0)  # entries that can no longer change
        per = self._per_ledger(ledger)
        k, curve = per.get(adaptive, (0, None))
        if curve is None or k > closed:  # not yet summed (or a ledger that shrank: restart)
            k, curve = 0, np.zeros(len(self.adaptive_orders if adaptive else self.orders))
        if n < k:  # an older prefix: sum it from the start
            return self.rdp(entries[:n], adaptive=adaptive)
        check_events(entries[k:n], self.name, _KINDS)
        while k < min(n, closed):
            curve = curve + entries[k].steps * self.step_rdp(entries[k], adaptive=adaptive)
            k += 1
        per[adaptive] = (k, curve)
        for e in entries[k:n]:  # at most the last entry, which may still grow
            curve = curve + e.steps * self.step_rdp(e, adaptive=adaptive)
        return curve

    def _per_ledger(self, ledger: Ledger) -> dict[bool, tuple[int, np.ndarray]]:
        hit = self._closed.get(id(ledger))
        if hit is not None and hit[0]() is ledger:
            return hit[1]
        if len(self._closed) >= 16:  # forget ledgers that are gone
            self._closed = {i: v for i, v in self._closed.items() if v[0]() is not None}
        per: dict[bool, tuple[int, np.ndarray]] = {}
        self._closed[id(ledger)] = (weakref.ref(ledger), per)
        return per

    def ledger_epsilon(self, ledger: Ledger, delta: float, *, adaptive: bool = False) -> float:
        """:meth:`epsilon` (or :meth:`adaptive_epsilon`) of ``ledger``, by :meth:`ledger_rdp`."""
        delta = check_delta(delta)
        if adaptive:
            return adaptive_epsilon_from_rdp(
                self.adaptive_orders, self.ledger_rdp(ledger, adaptive=True), delta
            )
        return epsilon_from_rdp(self.orders, self.ledger_rdp(ledger), delta)

    # -- the accountant interface ----------------------------------------------------------

    def epsilon(self, events: Sequence[Event], delta: float) -> float:
        """Smallest epsilon at ``delta`` for non-adaptively chosen events."""
        delta = check_delta(delta)
        return epsilon_from_rdp(self.orders, self.rdp(events), delta)

    def delta(self, events: Sequence[Event], epsilon: float) -> float:
        epsilon = check_epsilon(epsilon)
        return delta_from_rdp(self.orders, self.rdp(events), epsilon)

    def adaptive_epsilon(self, events: Sequence[Event], delta: float) -> float:
        """Epsilon at ``delta`` valid even if each event's (q, sigma) was chosen from the outputs
        of earlier ones, as enforced by a privacy filter (union bound over the orders)."""
        delta = check_delta(delta)
        return adaptive_epsilon_from_rdp(
            self.adaptive_orders, self.rdp(events, adaptive=True), delta
        )

    def steps_evaluator(
        self, prefix: Sequence[Event], event: Event, delta: float, *, adaptive: bool = False
    ) -> Callable[[int], float]:
        """``k -> epsilon(prefix + [event x k])`` with the prefix curve computed once.

        Bitwise equal to :meth:`epsilon` / :meth:`adaptive_epsilon` of the same list when the
        prefix does not end with ``event``'s mechanism (the sum runs in the same order).
        ``prefix`` may be ``(ledger, n)``: the first ``n`` entries of a ledger, by
        :meth:`ledger_rdp`."""
        delta = check_delta(delta)
        orders = self.adaptive_orders if adaptive else self.orders
        convert = adaptive_epsilon_from_rdp if adaptive else epsilon_from_rdp
        if isinstance(prefix, tuple) and len(prefix) == 2 and isinstance(prefix[0], Ledger):
            base = self.ledger_rdp(prefix[0], prefix[1], adaptive=adaptive)
        else:
            base = self.rdp(prefix, adaptive=adaptive)
        step = self.step_rdp(check_events([event], self.name, _KINDS)[0], adaptive=adaptive)

        def f(k: int) -> float:
            return convert(orders, base if k == 0 else base + k * step, delta)

        return f

    def steps_estimate(
        self,
        prefix: Sequence[Event] | tuple[Ledger, int],
        event: Event,
        delta: float,
        epsilon: float,
        *,
        adaptive: bool = False,
    ) -> int | None:
        """The largest ``k`` with ``epsilon(prefix + [event x k]) <= epsilon``, in closed form,
        as a first guess for :func:`accountants.budget.largest_within` (which verifies it).

        Each order's bound ``B_a + k s_a + c_a`` (prefix curve ``B``, one step's curve ``s``,
        the conversion's constant ``c``) is linear in ``k``, and the conversion is its minimum
        over the orders, so the answer is ``max_a floor((epsilon - c_a - B_a) / s_a)``; rounding
        may move the true crossing by a step (the KL shortcut of the non-adaptive conversion,
        ignored here, only moves it up).  None when no finite guess exists (a free order)."""
        delta = check_delta(delta)
        orders = self.adaptive_orders if adaptive else self.orders
        if isinstance(prefix, tuple) and len(prefix) == 2 and isinstance(prefix[0], Ledger):
            base = self.ledger_rdp(prefix[0], prefix[1], adaptive=adaptive)
        else:
            base = self.rdp(prefix, adaptive=adaptive)
        step = self.step_rdp(check_events([event], self.name, _KINDS)[0], adaptive=adaptive)
        a = np.asarray(orders, dtype=np.float64)
        d = delta / len(a) if adaptive else delta
        c = np.log1p(-1.0 / a) - np.log(d * a) / (a - 1.0)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            room = (epsilon - c - np.maximum(base, 0.0)) / step
        room = np.where((a > 1.01) & np.isfinite(base) & (step > 0), room, -np.inf)
        if np.any((a > 1.01) & (step == 0) & (base + c <= epsilon)):
            return None  # an order that this event never charges: no finite crossing
        best = float(np.nanmax(room)) if room.size else -math.inf
        if not math.isfinite(best) or best > 2.0**52:
            return None if best > 0 else 0
        return max(0, math.floor(best))
