"""Privacy budget and the filter that refuses a step before it would exceed it.

:class:`BudgetFilter` answers "may the ledger take ``event`` now?" as
``epsilon(ledger + event) <= budget.epsilon`` at ``budget.delta``, where ``epsilon`` is the
accountant's own (upper-bound) epsilon, so a step it allows never makes the accountant report
more than the budget.

Caching.  Write the ledger as ``prefix + [e x taken]`` where ``e`` is the mechanism of the
queried event (``taken = 0`` unless the ledger ends with ``e``).  The filter computes, once per
(prefix, mechanism), the largest ``M`` with ``epsilon(prefix + [e x M]) <= budget`` and then
answers ``allows`` as ``taken + event.steps <= M``: a counter comparison, exact because epsilon
is non-decreasing in the step count.  Ledgers are append-only, so a prefix is identified by
(ledger object, length, steps of its last entry).  ``M`` is found by an expanding then
interpolating search on ``k -> epsilon(prefix + [e x k])``; the RDP accountant evaluates that
by vector arithmetic on its RDP curve (one conversion per probe), the PRV/PLD ones recompose.

Why counting down is sound even for numerically computed bounds: the filter only certifies
``epsilon(prefix + [e x M]) <= budget`` at the cached ``M``; for any ``k <= M`` the *true*
epsilon of ``prefix + [e x k]`` is at most the true epsilon at ``M`` (composition with more
steps cannot leak less), which is at most the accountant's upper bound at ``M``.  So every
state the filter allows is within budget.  The accountant's *reported* number at ``k < M`` is
also within budget whenever it is non-decreasing in ``k``: exactly so for RDP, and for PLD and
PRV by construction of their discretizations (see those modules).

Dominance certificates (PRV, PLD: accountants without a fast ``steps_evaluator``).  A schedule
that changes every step (sigma cycling over a few values) makes every query a new prefix, and
each probe of the search above a full composition.  On such a miss the filter instead
certifies, once, ``M = `` (close to) the largest ``k`` with

    epsilon(ledger_0 + [W x k]) <= budget * (1 - margin),

where ``ledger_0`` is the ledger at certification and ``W`` the *dominating* event of its
entries and of the queried event: same kind (poisson_gaussian), the largest q, the smallest
sigma.  Afterwards it allows, by a counter, any event dominated by ``W`` (q <= q_W, sigma >=
sigma_W) while the steps recorded since certification plus the event's fit in ``M``.
The search stops at a horizon, ``k <= max(CERTIFICATE_HORIZON, 2 * (steps so far + event))``:
a loose budget (epsilon 100 fits 10^5 steps of a typical event, 10^6 fits 10^10) would
otherwise compose millions of steps, which costs PRV and PLD seconds to minutes and, past
epsilon ~10^3, more memory than the machine has; a run that uses up a capped ``M``
re-certifies with a horizon twice its length (O(log T) certificates for T steps).

Why this is sound.  (i) A Poisson-subsampled Gaussian step (q, sigma) of sensitivity 1 has
the dominating pair P = (1 - q) N(0, sigma^2) + q N(1, sigma^2), Q = N(0, sigma^2) (both
directions: (P, Q) and (Q, P)).  For q <= q_W and sigma >= sigma_W that pair is the image of
W's pair under one fixed kernel: add independent N(0, sigma^2 - sigma_W^2), then with
probability 1 - q / q_W replace the value by a fresh draw of N(0, sigma^2) (the mixture
identity P = (1 - q/q_W) Q + (q/q_W) P_W after the noise).  By data processing of
hockey-stick divergences W's pair dominates the step too.  (ii) Composition of
mechanisms with fixed (public, non-adaptive) parameters is dominated by the product of their
pairs, even when each step's input depends on earlier outputs; replacing factors by
dominating ones and adding factors can only increase every hockey-stick divergence.  Hence
for the exact ledger ``L = ledger_0 + S`` with ``|S| <= M`` steps dominated by W, the *true*
epsilon satisfies ``eps(L) <= eps(ledger_0 + [W x |S|]) <= eps(ledger_0 + [W x M]) <=
bound(ledger_0 + [W x M]) <= budget * (1 - margin)``.  Only the certified point is trusted (it
is evaluated); no monotonicity of the numerical bound is assumed.  So the filter's guarantee
(the true epsilon of every allowed state is within budget) rests on the accountant's bound at
one point, as for the exact path.

The reported epsilon.  What a run *reports* is the accountant's bound of the exact ledger,
``bound(L)``, which lies above ``eps(L)`` by the accountant's estimation error; ``margin`` is
the accountant's ``report_margin``, a bound on that relative error (PRV: from the library's
error theorem; PLD: the measured discretization error with 5x room), so ``bound(L) <=
(1 + margin) * budget * (1 - margin) < budget``.  At the stop the exact check has decided the
last step, so the reported epsilon there is within budget by construction.  Inside the last
margin (the certificate cannot cover one more step), for an event whose steps do not fit, and
for every refusal, the exact check decides (``bound(ledger + event) <= budget``, one
composition; the cached count search when the same prefix is asked twice); an event not
dominated by ``W`` triggers a new certificate with the new dominating event.  RDP keeps its
exact counter (its ``steps_evaluator`` is cheap), and so does ``adaptive=True``.

``adaptive=True`` guards a data-dependent schedule: it needs an accountant with
``adaptive_valid`` and uses its ``adaptive_epsilon`` (for RDP: the union-bound conversion, see
:mod:`accountants.rdp`).
"""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .base import Accountant, check_delta, get_accountant
from .ledger import POISSON_GAUSSIAN, Event, Ledger

UNLIMITED = sys.maxsize
"""``max_steps`` of an event that costs nothing (sigma = inf) while the budget holds."""

_CACHE_SIZE = 16
CERTIFICATE_HORIZON = 1024
"""A certificate covers at most ``max(this, 2 * (ledger steps + event steps))`` steps."""
CERTIFICATE_RTOL = 1 / 32
"""A certificate's count is within this fraction of the largest certifiable one (fewer probes)."""


class BudgetExceeded(RuntimeError):
    """A step was refused because it would push epsilon past the budget."""


@dataclass
class Budget:
    """A privacy budget: (epsilon, delta)-DP for the whole run."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        eps = float(self.epsilon)
        if math.isnan(eps) or eps < 0:
            raise ValueError(f"budget epsilon must be >= 0, got {self.epsilon!r}")
        self.epsilon = eps
        self.delta = check_delta(self.delta)


def largest_within(
    f: Callable[[int], float],
    target: float,
    *,
    guess: int = 1,
    cap: int = UNLIMITED,
    exact_guess: bool = False,
) -> int:
    """Largest ``k`` in ``[0, cap]`` with ``f(k) <= target`` for non-decreasing ``f``; -1 if
    ``f(0) > target``.  The answer is always evaluated: ``f(k) <= target < f(k + 1)``.
    ``exact_guess``: ``guess`` is expected to be the answer; two probes confirm it (else the
    search runs as without it)."""
    if exact_guess and 0 <= guess < cap and f(guess) <= target and not f(guess + 1) <= target:
        return guess
    f_lo = f(0)
    if not f_lo <= target:
        return -1
    lo = 0
    k = max(1, min(guess, cap))
    while True:  # expand until a probe fails
        f_k = f(k)
        if not f_k <= target:
            hi, f_hi = k, f_k
            break
        lo, f_lo = k, f_k
        if k >= cap:
            return cap
        step = 2 * k
        if f_k > 0:  # epsilon grows about like sqrt(k): jump near the crossing, then past it
            step = max(step, int(min(k * (target / f_k) ** 2 * 1.05 + 1, float(cap))))
        k = min(cap, step)
    interpolate = True
    while hi - lo > 1:  # f(lo) <= target < f(hi)
        width = hi - lo
        c = (lo + hi) // 2
        if interpolate and lo > 0 and 0 < f_lo < target < f_hi < math.inf:
            power = math.log(f_hi / f_lo) / math.log(hi / lo)
            if power > 0:
                c = int(lo * (target / f_lo) ** (1 / power))
        c = min(max(c, lo + 1), hi - 1)
        f_c = f(c)
        if f_c <= target:
            lo, f_lo = c, f_c
            if c + 1 < hi:  # interpolation lands just below the crossing: close the bracket
                f_n = f(c + 1)
                if f_n <= target:
                    lo, f_lo = c + 1, f_n
                else:
                    hi, f_hi = c + 1, f_n
        else:
            hi, f_hi = c, f_c
        interpolate = (hi - lo) * 2 <= width  # bisect next if the bracket did not halve
    return lo


def near_largest(
    f: Callable[[int], float],
    target: float,
    *,
    guess: int = 1,
    rtol: float = CERTIFICATE_RTOL,
    cap: int = UNLIMITED // 4,
) -> int:
    """A ``k`` in ``[1, cap]`` with ``f(k) <= target`` *evaluated*, within ``max(1, rtol * k)``
    of the largest such ``k`` of a non-decreasing ``f`` (``cap`` itself if ``f(cap)`` fits); 0
    if ``f(1) > target`` (``f(0)`` is never evaluated).  Unlike :func:`largest_within`, the answer is trusted only at the returned
    point, so ``f`` need not be exactly monotone for the result to be certified."""

    def tol(k: int) -> int:
        return max(1, int(rtol * k))

    lo, f_lo = 0, 0.0
    k = max(1, min(guess, cap))
    while True:  # expand until a probe fails
        f_k = f(k)
        if not f_k <= target:
            hi, f_hi = k, f_k
            break
        if k >= cap:
            return k
        step = 2 * k
        if f_k > 0:  # epsilon grows about like k^p, p in [1/2, 1]: jump to or past the crossing
            step = max(step, int(min(k * (target / f_k) ** 2 * 1.05 + 1, 64.0 * k)))
        if lo > 0 and f_lo < f_k < target:  # a long prefix: the secant, with room (concave)
            step = min(step, k + int(1.25 * (target - f_k) * (k - lo) / (f_k - f_lo)) + 1)
        lo, f_lo = k, f_k
        k = min(max(step, k + 1), cap)
    while hi - lo > tol(lo):  # f(lo) <= target < f(hi)
        c = (lo + hi) // 2
        if lo > 0 and f_lo < target < f_hi < math.inf:  # the chord: below the crossing of a
            c = lo + int((target - f_lo) * (hi - lo) / (f_hi - f_lo))  # concave f; then +tol
        c = min(max(c, lo + 1), hi - 1)
        f_c = f(c)
        if f_c <= target:
            lo, f_lo = c, f_c
            if lo + tol(lo) < hi:
                c = lo + tol(lo)
                f_c = f(c)
                if f_c <= target:
                    lo, f_lo = c, f_c
                else:
                    hi, f_hi = c, f_c
        else:
            hi, f_hi = c, f_c
    return lo


def dominates(w: Event, e: Event) -> bool:
    """Is ``e`` dominated by ``w``: both Poisson-subsampled Gaussians (no params) with
    ``q_e <= q_w`` and ``sigma_e >= sigma_w``, or ``e`` free (sigma = inf)?  Then ``e``'s step
    is a post-processing of ``w``'s (see the module docstring)."""
    if e.kind != POISSON_GAUSSIAN or e.params or w.kind != POISSON_GAUSSIAN or w.params:
        return False
    if math.isinf(e.noise_multiplier):
        return True
    return e.sample_rate <= w.sample_rate and e.noise_multiplier >= w.noise_multiplier


def dominating_event(events: list[Event]) -> Event | None:
    """One step of the least private Poisson-subsampled Gaussian dominating every event (the
    largest q and the smallest sigma of the events that cost anything); None if an event is of
    another kind or every event is free."""
    costly = [e for e in events if not math.isinf(e.noise_multiplier)]
    if any(e.kind != POISSON_GAUSSIAN or e.params for e in events) or not costly:
        return None
    return Event(max(e.sample_rate for e in costly), min(e.noise_multiplier for e in costly), 1)


@dataclass
class _Certificate:
    """``epsilon(ledger_0 + [dominating x allowed]) <= budget * (1 - margin)`` was evaluated,
    ``ledger_0`` being ``ledger``'s first ``base`` entries, the last of them then ``base_steps``
    steps long.  ``upto`` / ``closed``: entries ``[start, upto)`` are no longer the last one, are
    checked dominated (those at index >= base) and hold ``closed`` steps recorded since."""

    ledger: Ledger
    dominating: Event
    allowed: int
    base: int
    base_steps: int
    upto: int
    closed: int

    @classmethod
    def at(cls, ledger: Ledger, dominating: Event, allowed: int) -> _Certificate:
        entries = ledger._events
        n = len(entries)
        if not n:
            return cls(ledger, dominating, allowed, 0, 0, 0, 0)
        steps = entries[-1].steps
        return cls(ledger, dominating, allowed, n, steps, n - 1, -steps)

    def certified_events(self) -> list[Event]:
        """``ledger_0 + [dominating x allowed]``: the composition the certificate evaluated."""
        base = self.ledger.events[: self.base]
        if base:
            base[-1] = base[-1].with_steps(self.base_steps)
        return [*base, self.dominating.with_steps(self.allowed)] if self.allowed else base

    def used(self) -> int | None:
        """Steps recorded since certification, or None if one of them is not dominated (the
        certificate no longer covers the ledger).  Amortized O(1): each entry is read once
        after it stops being the last."""
        entries = self.ledger._events
        n = len(entries)
        if n < self.base:  # cannot happen for an append-only ledger
            return None
        while self.upto < n - 1:
            e = entries[self.upto]
            if self.upto >= self.base and not dominates(self.dominating, e):
                return None
            self.closed += e.steps
            self.upto += 1
        if not n:
            return 0
        last = entries[n - 1]
        if n - 1 >= self.base and not dominates(self.dominating, last):
            return None
        return self.closed + last.steps


def _generic_evaluator(
    accountant: Accountant, prefix: list[Event], event: Event, delta: float, adaptive: bool
) -> Callable[[int], float]:
    eps = accountant.adaptive_epsilon if adaptive else accountant.epsilon  # type: ignore[attr-defined]

    def f(k: int) -> float:
        return eps([*prefix, event.with_steps(k)] if k > 0 else prefix, delta)

    return f


def ledger_epsilon(accountant: Accountant, ledger: Ledger, delta: float, adaptive: bool) -> float:
    """Epsilon of ``ledger`` at ``delta`` (the adaptive conversion if ``adaptive``): by the
    accountant's incremental ``ledger_epsilon`` where it has one (RDP), else from its events."""
    if not len(ledger):
        return 0.0
    fast = getattr(accountant, "ledger_epsilon", None)
    if fast is not None:
        return fast(ledger, delta, adaptive=adaptive)
    measure = accountant.adaptive_epsilon if adaptive else accountant.epsilon  # type: ignore[attr-defined]
    return measure(ledger.events, delta)


class BudgetFilter:
    """Refuses a step before it is taken if it would push epsilon past the budget."""

    def __init__(
        self, budget: Budget, accountant: str | Accountant = "rdp", *, adaptive: bool = False
    ) -> None:
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
        self.budget = budget
        self.accountant = get_accountant(accountant) if isinstance(accountant, str) else accountant
        self.adaptive = adaptive
        if adaptive:
            if not getattr(self.accountant, "adaptive_valid", False) or not hasattr(
                self.accountant, "adaptive_epsilon"
            ):
                raise ValueError(
                    f"the {self.accountant.name!r} accountant is not valid under adaptive "
                    "composition (parameters chosen from data); use accountant 'rdp'"
                )
        self._totals: OrderedDict[tuple, tuple[Ledger, int]] = OrderedDict()
        self._spent: OrderedDict[tuple, tuple[Ledger, float]] = OrderedDict()
        self._guide = None  # the RDP accountant of _guess, keeping its ledger curves
        margin = getattr(self.accountant, "report_margin", None)
        self.margin: float | None = None if margin is None else float(margin)
        """``budget * (1 - margin)`` bounds a certificate; None: no certificates (exact only)."""
        self._certificate: _Certificate | None = None
        # (ledger, {W}): the ledger was within the last margin for these W (no certificate
        # with them can cover a step: epsilon only grows as the ledger does)
        self._exhausted: tuple[Ledger, set[Event]] | None = None
        self._exact_last: tuple[Ledger, tuple] | None = None  # prefix of the last exact check
        self._ratio = 0.0  # certified count / RDP count of the last certificate (the guess)

    def __repr__(self) -> str:
        return (
            f"BudgetFilter(epsilon={self.budget.epsilon}, delta={self.budget.delta}, "
            f"accountant={self.accountant.name!r}, adaptive={self.adaptive})"
        )

    # -- helpers -------------------------------------------------------------------------------

    def _epsilon(self, events: list[Event]) -> float:
        if self.adaptive:
            return self.accountant.adaptive_epsilon(events, self.budget.delta)  # type: ignore[attr-defined]
        return self.accountant.epsilon(events, self.budget.delta)

    @staticmethod
    def _ledger(ledger: Ledger) -> Ledger:
        if isinstance(ledger, Ledger):
            return ledger
        raise TypeError(f"expected a Ledger, got {type(ledger).__name__}")

    def _evaluator(
        self, prefix: list[Event], event: Event, at: tuple[Ledger, int] | None = None
    ) -> Callable[[int], float]:
        hook = getattr(self.accountant, "steps_evaluator", None)
        if hook is not None:
            # (ledger, n): accountants that keep a ledger's curve incrementally (RDP)
            where = at if at is not None and hasattr(self.accountant, "ledger_rdp") else prefix
            return hook(where, event, self.budget.delta, adaptive=self.adaptive)
        return _generic_evaluator(self.accountant, prefix, event, self.budget.delta, self.adaptive)

    def _guess(
        self,
        prefix: list[Event],
        event: Event,
        at: tuple[Ledger, int],
        target: float | None = None,
    ) -> tuple[int, bool]:
        """First probe of the search for ``target`` (default: the budget's epsilon), and
        whether it is expected to be the answer: the accountant's closed-form estimate where it
        has one (RDP), else the RDP answer for accountants that are slow to evaluate (RDP
        epsilon is usually the larger, so the true answer is usually above it)."""
        target = self.budget.epsilon if target is None else target
        estimate = getattr(self.accountant, "steps_estimate", None)
        if estimate is not None:
            where = at if hasattr(self.accountant, "ledger_rdp") else prefix
            k = estimate(where, event, self.budget.delta, target, adaptive=self.adaptive)
            return (1, False) if k is None else (k, True)
        if hasattr(self.accountant, "steps_evaluator"):
            return 1, False
        from .rdp import RdpAccountant

        if self._guide is None:
            self._guide = RdpAccountant()
        f = self._guide.steps_evaluator(at, event, self.budget.delta)
        return max(1, largest_within(f, target)), False

    def _position(self, ledger: Ledger, event: Event) -> tuple[tuple, list[Event], int]:
        """(cache key, prefix, taken) with ledger == prefix + [event's mechanism x taken]."""
        entries = ledger._events  # read-only use; append-only, see Ledger
        n = len(entries)
        taken = 0
        if n and entries[-1].key == event.key:
            n -= 1
            taken = entries[-1].steps
        last_steps = entries[n - 1].steps if n else 0
        return (id(ledger), n, last_steps, event.key), entries[:n], taken

    def _cached(self, ledger: Ledger, event: Event) -> tuple[int, int] | None:
        """(M, taken) of :meth:`_total` if it is cached for this prefix, else None (O(1): the
        key of :meth:`_position` without copying the prefix)."""
        entries = ledger._events
        n = len(entries)
        taken = 0
        if n and entries[-1].key == event.key:
            n -= 1
            taken = entries[-1].steps
        key = (id(ledger), n, entries[n - 1].steps if n else 0, event.key)
        hit = self._totals.get(key)
        if hit is not None and hit[0] is ledger:
            self._totals.move_to_end(key)
            return hit[1], taken
        return None

    def _total(self, ledger: Ledger, event: Event, more: int | None = None) -> tuple[int, int]:
        """(M, taken): M is the largest total count of ``event``'s mechanism after the prefix
        that stays within budget (-1 if the prefix alone exceeds it); with ``more``, the search
        stops at ``taken + more`` (M is then ``min(M, taken + more)``)."""
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        key, prefix, taken = self._position(ledger, event)
        cap = UNLIMITED if more is None else taken + max(0, int(more))
        hit = self._totals.get(key)
        if hit is not None and hit[0] is ledger:
            self._totals.move_to_end(key)
            return min(hit[1], cap), taken
        if math.isinf(self.budget.epsilon):  # no budget (a non-private baseline on purpose)
            total = UNLIMITED
        elif math.isinf(event.noise_multiplier):  # free steps: only the prefix matters
            total = UNLIMITED if self._epsilon(prefix) <= self.budget.epsilon else -1
        else:
            at = (ledger, len(prefix))
            f = self._evaluator(prefix, event, at)
            guess, exact = self._guess(prefix, event, at)
            total = largest_within(f, self.budget.epsilon, guess=guess, cap=cap, exact_guess=exact)
        if total < cap:  # exact (a count at the cap is only a lower bound)
            self._totals[key] = (ledger, total)
            while len(self._totals) > _CACHE_SIZE:
                self._totals.popitem(last=False)
        return min(total, cap), taken

    # -- dominance certificates (see the module docstring) ---------------------------------------

    def _certifies(self, event: Event) -> bool:
        """Does a certificate apply: an accountant with a ``report_margin`` and no fast
        ``steps_evaluator``, a non-adaptive finite budget, a costly Poisson-Gaussian event?"""
        return (
            self.margin is not None
            and not self.adaptive
            and not hasattr(self.accountant, "steps_evaluator")
            and math.isfinite(self.budget.epsilon)
            and not math.isinf(event.noise_multiplier)
            and event.kind == POISSON_GAUSSIAN
            and not event.params
        )

    def _certify(self, ledger: Ledger, event: Event) -> _Certificate | None:
        """A new certificate for ``ledger`` and a dominating event of its entries and
        ``event``; None if no event dominates them all."""
        assert self.margin is not None
        events = ledger.events
        w = dominating_event([*events, event])
        if w is None:
            return None
        target = self.budget.epsilon * (1.0 - self.margin)
        ex = self._exhausted
        if ex is not None and ex[0] is ledger and w in ex[1]:
            return _Certificate.at(ledger, w, 0)  # already within the last margin with this W

        def f(k: int) -> float:
            return self._epsilon([*events, w.with_steps(k)])

        rdp, _ = self._guess(events, w, (ledger, len(events)), target)
        # the accountant's count over RDP's, as the last certificate found it: a closer guess
        guess = max(1, int(rdp * self._ratio)) if self._ratio else rdp
        horizon = max(CERTIFICATE_HORIZON, 2 * (ledger.total_steps + event.steps))
        cert = _Certificate.at(ledger, w, near_largest(f, target, guess=guess, cap=horizon))
        if 0 < cert.allowed < horizon and rdp > 0:  # a capped count says nothing of the ratio
            self._ratio = cert.allowed / rdp
        if cert.allowed == 0:  # the ledger is in the last margin for W: exact checks from now
            if ex is None or ex[0] is not ledger:
                self._exhausted = ex = (ledger, set())
            ex[1].add(w)
        return cert

    def _certified(self, ledger: Ledger, event: Event) -> bool:
        """Does the current (or a renewed) certificate cover ``ledger + event``?"""
        cert = self._certificate
        if cert is not None and cert.ledger is ledger and dominates(cert.dominating, event):
            used = cert.used()
            if used is not None and used + event.steps <= cert.allowed:
                return True
        cert = self._certify(ledger, event)
        if cert is None:
            return False
        self._certificate = cert
        return event.steps <= cert.allowed

    def _exact_allows(self, ledger: Ledger, event: Event) -> bool:
        """``epsilon(ledger + event) <= budget`` by one composition; the count search of
        :meth:`_total` (cached, then a counter) when the same prefix is asked again."""
        entries = ledger._events
        n = len(entries) - (1 if entries and entries[-1].key == event.key else 0)
        key = (n, entries[n - 1].steps if n else 0, event.key)
        last = self._exact_last
        if last is not None and last[0] is ledger and last[1] == key:
            total, taken = self._total(ledger, event)
            return total == UNLIMITED or taken + event.steps <= total
        self._exact_last = (ledger, key)
        return self._epsilon([*ledger.events, event]) <= self.budget.epsilon

    # -- public interface ----------------------------------------------------------------------

    def spent(self, ledger: Ledger) -> float:
        """Epsilon of ``ledger`` at ``budget.delta`` (the adaptive conversion if ``adaptive``)."""
        ledger = self._ledger(ledger)
        entries = ledger._events
        key = (id(ledger), len(entries), entries[-1].steps if entries else 0)
        hit = self._spent.get(key)
        if hit is not None and hit[0] is ledger:
            return hit[1]
        eps = ledger_epsilon(self.accountant, ledger, self.budget.delta, self.adaptive)
        self._spent[key] = (ledger, eps)
        while len(self._spent) > _CACHE_SIZE:
            self._spent.popitem(last=False)
        return eps

    def max_steps(self, ledger: Ledger, event: Event, cap: int | None = None) -> int:
        """How many more steps of ``event``'s mechanism fit the budget (``event.steps`` is
        ignored); :data:`UNLIMITED` for a free mechanism while the budget holds.  With ``cap``,
        ``min(that, cap)``, searched only up to ``cap`` (what a run with ``cap`` steps left
        needs to know; the full count of a loose budget can be billions of steps, which PRV
        and PLD cannot compose)."""
        total, taken = self._total(self._ledger(ledger), event, cap)
        if total == UNLIMITED:
            return UNLIMITED
        return max(0, total - taken)

    def allows(self, ledger: Ledger, event: Event) -> bool:
        """Would ``ledger + event`` (all ``event.steps`` of it) stay within the budget?  A
        refusal is always exact; an allowance is exact or certified by dominance."""
        ledger = self._ledger(ledger)
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        hit = self._cached(ledger, event)
        if hit is None and self._certifies(event):
            return self._certified(ledger, event) or self._exact_allows(ledger, event)
        total, taken = hit if hit is not None else self._total(ledger, event)
        return total == UNLIMITED or taken + event.steps <= total
