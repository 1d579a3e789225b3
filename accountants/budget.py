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
from .ledger import Event, Ledger

UNLIMITED = sys.maxsize
"""``max_steps`` of an event that costs nothing (sigma = inf) while the budget holds."""

_CACHE_SIZE = 16


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

    def _guess(self, prefix: list[Event], event: Event, at: tuple[Ledger, int]) -> tuple[int, bool]:
        """First probe of the search, and whether it is expected to be the answer: the
        accountant's closed-form estimate where it has one (RDP), else the RDP answer for
        accountants that are slow to evaluate (RDP epsilon is usually the larger, so the true
        answer is usually above it)."""
        estimate = getattr(self.accountant, "steps_estimate", None)
        if estimate is not None:
            where = at if hasattr(self.accountant, "ledger_rdp") else prefix
            k = estimate(
                where, event, self.budget.delta, self.budget.epsilon, adaptive=self.adaptive
            )
            return (1, False) if k is None else (k, True)
        if hasattr(self.accountant, "steps_evaluator"):
            return 1, False
        from .rdp import RdpAccountant

        if self._guide is None:
            self._guide = RdpAccountant()
        f = self._guide.steps_evaluator(at, event, self.budget.delta)
        return max(1, largest_within(f, self.budget.epsilon)), False

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

    def _total(self, ledger: Ledger, event: Event) -> tuple[int, int]:
        """(M, taken): M is the largest total count of ``event``'s mechanism after the prefix
        that stays within budget (-1 if the prefix alone exceeds it)."""
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, got {type(event).__name__}")
        key, prefix, taken = self._position(ledger, event)
        hit = self._totals.get(key)
        if hit is not None and hit[0] is ledger:
            self._totals.move_to_end(key)
            return hit[1], taken
        if math.isinf(self.budget.epsilon):  # no budget (a non-private baseline on purpose)
            total = UNLIMITED
        elif math.isinf(event.noise_multiplier):  # free steps: only the prefix matters
            total = UNLIMITED if self._epsilon(prefix) <= self.budget.epsilon else -1
        else:
            at = (ledger, len(prefix))
            f = self._evaluator(prefix, event, at)
            guess, exact = self._guess(prefix, event, at)
            total = largest_within(f, self.budget.epsilon, guess=guess, exact_guess=exact)
        self._totals[key] = (ledger, total)
        while len(self._totals) > _CACHE_SIZE:
            self._totals.popitem(last=False)
        return total, taken

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

    def max_steps(self, ledger: Ledger, event: Event) -> int:
        """How many more steps of ``event``'s mechanism fit the budget (``event.steps`` is
        ignored); :data:`UNLIMITED` for a free mechanism while the budget holds."""
        total, taken = self._total(self._ledger(ledger), event)
        if total == UNLIMITED:
            return UNLIMITED
        return max(0, total - taken)

    def allows(self, ledger: Ledger, event: Event) -> bool:
        """Would ``ledger + event`` (all ``event.steps`` of it) stay within the budget?"""
        total, taken = self._total(self._ledger(ledger), event)
        return total == UNLIMITED or taken + event.steps <= total
