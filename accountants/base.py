"""The accountant interface, the registry, and validation shared by the accountants.

An accountant maps a sequence of events (see :mod:`accountants.ledger`) to an (epsilon, delta)
differential-privacy guarantee of their composition, for add/remove-one neighbouring datasets:
``epsilon(events, delta)`` is the smallest epsilon it can certify at ``delta`` and
``delta(events, epsilon)`` the smallest delta at ``epsilon``.  Both are upper bounds on the true
privacy curve (never estimates), so a caller may rely on them.

``adaptive_valid`` says whether the accountant also supports *fully adaptive* composition
(parameters of step t chosen after seeing the outputs of steps < t).  Only then may it guard a
data-dependent policy, and then through ``BudgetFilter(..., adaptive=True)`` or its
``adaptive_epsilon`` method; see :mod:`accountants.rdp` for the argument.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

from .ledger import POISSON_GAUSSIAN, Event


class DeltaBelowFloorError(ValueError):
    """The requested delta is below the floating-point floor of a numerical composition (PLD,
    and PRV where it falls back to PLD): no epsilon there is certain.  Fix: a larger delta or
    the ``rdp`` accountant."""


class UnsupportedEventError(ValueError):
    """An accountant was given an event kind it cannot account for."""


@runtime_checkable
class Accountant(Protocol):
    """(epsilon, delta) accounting of a composition of events; results are upper bounds."""

    name: str  # "rdp" | "prv" | "pld"
    adaptive_valid: bool  # True only where valid under fully adaptive composition

    def epsilon(self, events: Sequence[Event], delta: float) -> float: ...

    def delta(self, events: Sequence[Event], epsilon: float) -> float: ...


# -- registry --------------------------------------------------------------------------------

_BUILTIN = {
    "rdp": ("accountants.rdp", "RdpAccountant"),
    "prv": ("accountants.prv", "PrvAccountant"),
    "pld": ("accountants.pld", "PldAccountant"),
}
_REGISTRY: dict[str, Callable[..., Accountant]] = {}


def register_accountant(name: str, factory: Callable[..., Accountant]) -> None:
    """Make ``get_accountant(name, **options)`` return ``factory(**options)``."""
    _REGISTRY[name] = factory


def available_accountants() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_accountant(name: str, **options: object) -> Accountant:
    """The accountant registered as ``name`` ("rdp", "prv", "pld"), built with ``options``."""
    if name in _REGISTRY:
        return _REGISTRY[name](**options)
    if name in _BUILTIN:
        module, cls = _BUILTIN[name]
        return getattr(importlib.import_module(module), cls)(**options)
    raise ValueError(
        f"unknown accountant {name!r}; known accountants: {', '.join(available_accountants())}"
    )


# -- validation and canonical forms ------------------------------------------------------------


def check_delta(delta: float) -> float:
    """``delta`` as a float in (0, 1), else ValueError."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        try:
            delta = float(delta)  # numpy scalars
        except (TypeError, ValueError):
            raise TypeError(f"delta must be a number, got {delta!r}") from None
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return delta


def check_epsilon(epsilon: float) -> float:
    """``epsilon`` as a float >= 0 (inf allowed), else ValueError."""
    try:
        epsilon = float(epsilon)
    except (TypeError, ValueError):
        raise TypeError(f"epsilon must be a number, got {epsilon!r}") from None
    if math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    return epsilon


def check_events(
    events: Iterable[Event], accountant: str, kinds: Iterable[str] = (POISSON_GAUSSIAN,)
) -> list[Event]:
    """The events as a list, after checking they are Events of a kind ``accountant`` supports."""
    out = list(events)
    supported = tuple(kinds)
    for e in out:
        if not isinstance(e, Event):
            raise TypeError(f"expected accountants.Event, got {type(e).__name__}: {e!r}")
        if e.kind not in supported:
            from .rdp import rdp_kinds

            fix = "use accountant 'rdp'" if e.kind in rdp_kinds() else "use an accountant that does"
            raise UnsupportedEventError(
                f"the {accountant!r} accountant does not support events of kind {e.kind!r} "
                f"(supported: {', '.join(supported)}); {fix}"
            )
    return out


def merge_consecutive(events: Iterable[Event]) -> list[Event]:
    """Merge neighbouring events with equal (kind, q, sigma), as :class:`Ledger` does."""
    out: list[Event] = []
    for e in events:
        if out and out[-1].key == e.key:
            out[-1] = out[-1].with_steps(out[-1].steps + e.steps)
        else:
            out.append(e)
    return out


def group_by_mechanism(events: Iterable[Event]) -> dict[tuple[str, float, float], int]:
    """Total steps per (kind, q, sigma), in order of first appearance.

    Composition of non-adaptively chosen mechanisms does not depend on their order, so the
    PLD and PRV accountants compose each distinct mechanism once, self-composed."""
    counts: dict[tuple[str, float, float], int] = {}
    for e in events:
        counts[e.key] = counts.get(e.key, 0) + e.steps
    return counts
