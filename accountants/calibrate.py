"""Calibration: the noise (or the number of steps) that meets a target (epsilon, delta).

``epsilon(sigma)`` of ``steps`` Poisson-subsampled Gaussian steps is non-increasing in sigma, so
the smallest admissible sigma is found by keeping a bracket ``lo < sigma* <= hi`` where
``epsilon(hi) <= target`` has been *evaluated* and ``epsilon(lo) > target``, and shrinking it
until ``hi / lo <= 1 + tol``.  Probes use the secant of ``log epsilon`` against ``log sigma``
(falling back to geometric bisection when the bracket stops halving), and the answer is
``hi``: rounded up, never down.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .base import Accountant, check_delta, get_accountant
from .budget import Budget, BudgetFilter
from .ledger import POISSON_GAUSSIAN, Event, Ledger, Params
from .rdp import RdpAccountant

SIGMA_MIN = 1e-4
SIGMA_MAX = 1e6


class EpsilonUnreachableError(ValueError):
    """No noise multiplier up to :data:`SIGMA_MAX` meets the target epsilon: the target, not
    the code, must change.  From :func:`calibrate_noise` the message says what limits it (for
    RDP, usually the floor of its conversion at delta: :func:`accountants.rdp.conversion_floor`)
    and which change helps.  A ``ValueError`` for callers that caught one before it existed."""


def _accountant(accountant: str | Accountant) -> Accountant:
    return get_accountant(accountant) if isinstance(accountant, str) else accountant


def _check(target_epsilon: float, sample_rate: float, steps: int) -> None:
    if not (0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon!r}")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def smallest_sigma(
    eps: Callable[[float], float], target: float, *, tol: float, start: float = 1.0
) -> float:
    """Smallest sigma (to relative ``tol``, rounded up) with ``eps(sigma) <= target`` for a
    non-increasing ``eps``; :class:`EpsilonUnreachableError` if none below :data:`SIGMA_MAX`."""
    hi, lo = start, None
    f_hi = eps(hi)
    while not f_hi <= target:  # find an admissible sigma
        lo, f_lo = hi, f_hi
        hi *= 4
        if hi > SIGMA_MAX:
            raise EpsilonUnreachableError(
                f"no noise multiplier up to {SIGMA_MAX:g} reaches epsilon <= {target}; "
                "raise the target epsilon or delta, or lower the sample rate or steps"
            )
        f_hi = eps(hi)
    if lo is None:  # find an inadmissible sigma below
        lo = hi
        while True:
            lo /= 4
            if lo < SIGMA_MIN:
                return hi  # epsilon <= target even at negligible noise
            f_lo = eps(lo)
            if not f_lo <= target:
                break
            hi, f_hi = lo, f_lo
    points = [(lo, f_lo), (hi, f_hi)]
    stalled = 0
    while hi / lo > 1 + tol:  # eps(lo) > target >= eps(hi)
        ratio = hi / lo
        c = math.sqrt(lo * hi)
        if stalled < 2:  # secant in log-log through the two points with eps nearest target
            near = sorted(
                (p for p in points if 0 < p[1] < math.inf),
                key=lambda p: abs(math.log(p[1] / target)),
            )[:2]
            if len(near) == 2 and near[0][0] != near[1][0] and near[0][1] != near[1][1]:
                (s1, f1), (s2, f2) = near
                slope = math.log(f1 / f2) / math.log(s2 / s1)
                if slope > 0:  # just above the estimated crossing (in logs: a nearly flat
                    # eps, e.g. RDP near its conversion floor, puts it far outside the bracket)
                    log_c = math.log(s1) + math.log(f1 / target) / slope + math.log1p(tol / 4)
                    c = math.exp(min(max(log_c, math.log(lo)), math.log(hi)))
        c = min(max(c, lo * (1 + tol / 8)), hi / (1 + tol / 8))
        f_c = eps(c)
        points.append((c, f_c))
        if f_c <= target:
            hi, f_hi = c, f_c
            below = hi / (1 + 0.9 * tol)  # try to close the bracket from below at once
            if stalled < 2 and below > lo:
                f_b = eps(below)
                points.append((below, f_b))
                if f_b <= target:
                    hi, f_hi = below, f_b
                else:
                    lo, f_lo = below, f_b
        else:
            lo, f_lo = c, f_c
        stalled = 0 if (hi / lo) ** 2 <= ratio else stalled + 1  # bisect when not halving
    return hi


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str | Accountant = "rdp",
    *,
    tol: float = 1e-3,
    kind: str = POISSON_GAUSSIAN,
    params: Params | dict[str, float] = (),
) -> float:
    """Smallest noise multiplier sigma whose epsilon(delta) <= target (bisection on the monotone
    epsilon(sigma)).  The returned sigma satisfies the target (rounded up, never down) and
    ``sigma / (1 + tol)`` does not.  ``kind`` and ``params`` select another event kind whose
    epsilon is non-increasing in sigma (e.g. ``error_feedback``).  An unreachable target
    raises :class:`EpsilonUnreachableError`; bad arguments, a plain ``ValueError``."""
    _check(target_epsilon, sample_rate, steps)
    delta = check_delta(delta)
    if not (0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    acc = _accountant(accountant)

    def eps(sigma: float, acc: Accountant = acc) -> float:
        return acc.epsilon([Event(sample_rate, sigma, steps, kind, params)], delta)

    start = 1.0
    if acc.name != "rdp":  # RDP overestimates epsilon, so its sigma is a near admissible start
        try:
            start = smallest_sigma(
                lambda s: eps(s, get_accountant("rdp")),
                target_epsilon,
                tol=0.05,
            )
        except EpsilonUnreachableError:  # below RDP's conversion floor: no hint, not a failure
            start = 1.0
    try:
        return smallest_sigma(eps, target_epsilon, tol=tol, start=start)
    except EpsilonUnreachableError:
        raise EpsilonUnreachableError(
            _unreachable(acc, eps(SIGMA_MAX), target_epsilon, delta, sample_rate, steps)
        ) from None


def _unreachable(
    acc: Accountant, at_max: float, target: float, delta: float, sample_rate: float, steps: int
) -> str:
    """Why no sigma up to :data:`SIGMA_MAX` reaches ``target``, and the fix.

    RDP: its conversion never certifies less than ``conversion_floor(orders, delta)`` (the
    largest order's ``log1p(-1/a) - log(delta a) / (a - 1)``; 0.0035 at delta = 1e-5 with
    orders up to 1024), whatever the noise, but for the KL shortcut to epsilon 0 (a curve under
    about delta^2: few steps at a low sample rate); beyond it only a larger delta, another
    accountant or a larger target helps.  Just above the floor, epsilon(sigma) ~ floor + c
    steps q^2 / sigma^2, so there fewer steps or a lower sample rate help too."""
    head = (
        f"no noise multiplier up to {SIGMA_MAX:g} reaches epsilon <= {target:g} with the "
        f"{acc.name!r} accountant at delta={delta:g}, q={sample_rate:g}, {steps} steps "
        f"(epsilon at sigma={SIGMA_MAX:g}: {at_max:.4g})"
    )
    orders = getattr(acc, "orders", None)
    if isinstance(acc, RdpAccountant) and orders:
        from .rdp import conversion_floor, delta_for_floor

        floor, order = conversion_floor(orders, delta)
        need = delta_for_floor(orders, target)
        largest = ", the largest" if order == max(orders) else ""
        why = (
            f"the RDP-to-(epsilon, delta) conversion certifies no epsilon below {floor:.4g} at "
            f"this delta however large the noise, but for epsilon 0 by the KL shortcut (a limit "
            f"of its order list: the floor is set by order {order:g}{largest}), "
        )
        if target < floor:
            return (
                f"{head}: {why}and the target is below it (only a curve small enough for the "
                f"KL shortcut, epsilon 0, gets under it: few steps at a low sample rate). Fix: "
                f"use the 'pld' or 'prv' accountant "
                f"(their epsilon has no such floor), raise delta (the floor drops below "
                f"{target:g} only for delta well above {need:.2g}), or raise the target epsilon"
            )
        return (
            f"{head}: {why}and the target is so close to it that it needs more noise than "
            f"{SIGMA_MAX:g}. Fix: use the 'pld' or 'prv' accountant, raise delta, take fewer "
            f"steps or a lower sample rate, or raise the target epsilon"
        )
    return (
        f"{head}. Fix: raise the target epsilon or delta, take fewer steps or a lower sample "
        f"rate, or use another accountant"
    )


def calibrate_steps(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    noise_multiplier: float,
    accountant: str | Accountant = "rdp",
) -> int:
    """Most steps of (sample_rate, noise_multiplier) whose epsilon(delta) <= target
    (``accountants.budget.UNLIMITED`` if the steps cost nothing)."""
    _check(target_epsilon, sample_rate, 1)
    budget = Budget(target_epsilon, delta)
    fil = BudgetFilter(budget, _accountant(accountant))
    return fil.max_steps(Ledger(), Event(sample_rate, noise_multiplier))
