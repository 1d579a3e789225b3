"""A fixed public grid of Poisson-Gaussian mechanisms, and ledger compression onto it.

The grid.  Level ``j >= 0`` has the points ``rho_j^n`` (``n`` any integer) with ratio
``rho_j = (1 + 1/64)^(2^j)``, anchored at 1.0; every level-``j`` point is a level-``(j - 1)``
point, so coarser levels are sub-grids.  Level :data:`EXACT` (-1) is the identity.  A
Poisson-subsampled Gaussian step (q, sigma) is rounded to ``(q_up_j(q), sigma_down_j(sigma))``:
the smallest level-``j`` point ``>= q`` (at most 1) and the largest ``<= sigma``.  The grid is
public (it depends on no data), so rounding is a fixed function of the public ledger.

Soundness.  A step (q, sigma) with ``q <= q'`` and ``sigma >= sigma'`` is dominated by (q',
sigma') (a post-processing of it: :mod:`accountants.budget`), so a rounded step dominates the
step, and replacing every entry of a non-adaptive ledger by its rounded step can only raise
every hockey-stick divergence of the composition: the accountant's bound of the gridded
ledger is an *upper bound* on the true epsilon of the ledger.  Rounding is monotone (a
dominated step rounds to a dominated point) and coarser levels dominate finer ones
(``q_up_j <= q_up_{j+1}``, ``sigma_down_j >= sigma_down_{j+1}``), which the budget filter uses.

Compression.  PLD and PRV compose each distinct mechanism once (self-composed by FFT), so their
cost grows with the number of distinct mechanisms, not steps: a schedule whose noise decays
every step makes a ledger of thousands of distinct mechanisms, minutes per composition.  When
a ledger has more than ``max_exact`` distinct costly mechanisms, :func:`compress` replaces it by
its rounding at :func:`ledger_level`, the finest level with at most ``max_exact`` distinct
points, equal points grouped as step counts; at or below ``max_exact`` the ledger is composed
exactly.  The price: q up and sigma down by factors of at most ``rho_j`` each; where epsilon
grows about like q / sigma (small q) that is about ``rho_j^2 - 1`` (:func:`gap_estimate`:
3.1% at level 0; measured in benchmarks/README.md), a heuristic, not a theorem (the gridded
value is an upper bound whatever the gap).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .base import check_events
from .ledger import POISSON_GAUSSIAN, Event

GRID_RATIO = 1.0 + 1.0 / 64
"""Ratio of neighbouring level-0 grid points (the grid is anchored at 1.0)."""
_LOG_RATIO = math.log(GRID_RATIO)
EXACT = -1
"""The level that does not round (the identity)."""
MAX_LEVEL = 12
"""The coarsest level (ratio ~ 1e27: every q rounds to 1); a ledger is never rounded coarser."""
MAX_EXACT_MECHANISMS = 64
"""Default number of distinct costly mechanisms above which PLD and PRV compose on the grid."""


def check_max_exact(value: int | None) -> int | None:
    """An accountant's ``max_exact_mechanisms``: None (never grid) or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_exact_mechanisms must be an integer >= 1 or None, got {value!r}")
    return value


def _point(n: int) -> float:
    return math.exp(n * _LOG_RATIO)


def _index_down(x: float) -> int:
    """The largest ``n`` with ``_point(n) <= x`` (x > 0, finite)."""
    n = math.floor(math.log(x) / _LOG_RATIO)
    while _point(n) > x:
        n -= 1
    while _point(n + 1) <= x:
        n += 1
    return n


def _index_up(x: float) -> int:
    """The smallest ``n`` with ``_point(n) >= x`` (x > 0, finite)."""
    n = math.ceil(math.log(x) / _LOG_RATIO)
    while _point(n) < x:
        n += 1
    while _point(n - 1) >= x:
        n -= 1
    return n


def _check_level(level: int) -> int:
    if not EXACT <= level <= MAX_LEVEL:
        raise ValueError(f"grid level must be in [{EXACT}, {MAX_LEVEL}], got {level!r}")
    return level


def sigma_down(sigma: float, level: int = 0) -> float:
    """The largest level-``level`` grid point ``<= sigma`` (0 and inf are kept)."""
    if _check_level(level) == EXACT or sigma == 0 or math.isinf(sigma):
        return sigma
    n = _index_down(sigma) >> level << level  # floor to a multiple of 2^level
    return _point(n)


def q_up(q: float, level: int = 0) -> float:
    """The smallest level-``level`` grid point ``>= q``, at most 1."""
    if _check_level(level) == EXACT:
        return q
    n = -((-_index_up(q)) >> level << level)  # ceil to a multiple of 2^level
    return min(1.0, _point(n))


def costly(e: Event) -> bool:
    """Does the step cost anything (sigma < inf)?  PLD and PRV drop the free ones."""
    return not math.isinf(e.noise_multiplier)


def grid_event(e: Event, level: int) -> Event:
    """``e`` rounded to the level's grid (q up, sigma down); other kinds and free steps as
    they are."""
    if level == EXACT or e.kind != POISSON_GAUSSIAN or e.params or not costly(e):
        return e
    return Event(q_up(e.sample_rate, level), sigma_down(e.noise_multiplier, level), e.steps)


def grid_key(e: Event, level: int) -> tuple:
    """The mechanism key of ``e`` rounded to the level's grid."""
    return grid_event(e, level).key if level != EXACT else e.key


def _distinct(events: Iterable[Event], level: int) -> int:
    return len({grid_key(e, level) for e in events})


def ledger_level(events: Sequence[Event], max_exact: int | None) -> int:
    """:data:`EXACT` if ``events`` have at most ``max_exact`` distinct costly mechanisms (or
    ``max_exact`` is None), else the finest level at which they round to at most
    ``max_exact`` distinct points (:data:`MAX_LEVEL` at most)."""
    if max_exact is None:
        return EXACT
    one = {}  # one event per distinct costly mechanism
    for e in events:
        if costly(e):
            one.setdefault(e.key, e)
    if len(one) <= max_exact:
        return EXACT
    reps = list(one.values())
    for level in range(MAX_LEVEL):
        if _distinct(reps, level) <= max_exact:
            return level
    return MAX_LEVEL


def compress(events: Sequence[Event], level: int) -> list[Event]:
    """``events`` rounded to the level's grid, equal mechanisms grouped (their steps added, in
    order of first appearance); the events unchanged at :data:`EXACT`."""
    if _check_level(level) == EXACT:
        return list(events)
    counts: dict[tuple, Event] = {}
    for e in events:
        g = grid_event(e, level)
        prev = counts.get(g.key)
        counts[g.key] = g if prev is None else prev.with_steps(prev.steps + g.steps)
    return list(counts.values())


def gap_estimate(level: int) -> float:
    """Heuristic relative excess of a level's gridded epsilon over the exact one,
    ``rho_level^2 - 1`` (0 at :data:`EXACT`); see the module docstring."""
    if _check_level(level) == EXACT:
        return 0.0
    return GRID_RATIO ** (2 * 2**level) - 1.0


def describe(level: int) -> str:
    """What a reported epsilon composed at ``level`` is, in one line."""
    if _check_level(level) == EXACT:
        return "exact composition of the ledger"
    ratio = "1 + 1/64" if level == 0 else f"(1 + 1/64)^{2**level}"
    return (
        f"gridded composition (level {level}: q rounded up, sigma down to the powers of "
        f"{ratio}): an upper bound, heuristically up to {gap_estimate(level):.1%} above the "
        "exact composition"
    )


def composition(accountant: object, events: Sequence[Event]) -> str:
    """How ``accountant`` composes ``events`` for the epsilon it reports (:func:`describe` of
    its grid level; exact for accountants that never grid, e.g. RDP, which adds per-step
    curves)."""
    level_of = getattr(accountant, "grid_level", None)
    return describe(level_of(events) if level_of is not None and events else EXACT)


class GriddedComposition:
    """The grid-level methods of an accountant with ``name`` and ``max_exact_mechanisms``."""

    name: str
    max_exact_mechanisms: int | None

    def grid_level(self, events: Sequence[Event]) -> int:
        """The grid level at which ``events`` are composed: -1 (exact) with at most
        ``max_exact_mechanisms`` distinct costly mechanisms."""
        return ledger_level(check_events(events, self.name), self.max_exact_mechanisms)

    def composed_events(self, events: Sequence[Event]) -> list[Event]:
        """The events this accountant composes: ``events``, or their gridded compression."""
        events = check_events(events, self.name)
        return compress(events, ledger_level(events, self.max_exact_mechanisms))
