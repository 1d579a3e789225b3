"""The public grid of mechanisms and gridded ledger compression (PLD, PRV; RDP unaffected)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from accountants import Event, Ledger, PldAccountant, PrvAccountant, RdpAccountant
from accountants.budget import dominates
from accountants.grid import (
    EXACT,
    GRID_RATIO,
    MAX_LEVEL,
    compress,
    describe,
    gap_estimate,
    grid_event,
    ledger_level,
    q_up,
    sigma_down,
)

DELTA = 1e-5
LEVELS = [0, 1, 2, 5, MAX_LEVEL]


def _values() -> np.ndarray:
    """Sorted values in (0, 10], with exact grid points and their float neighbours."""
    points = [GRID_RATIO**n for n in range(-300, 150, 7)] + [1.0, 0.5, 0.01, 0.2]
    near = [np.nextafter(p, 0) for p in points] + [np.nextafter(p, 2 * p) for p in points]
    grid = np.geomspace(1e-6, 10.0, 2001)
    return np.unique(np.concatenate([grid, points, near]))


def test_rounding_is_monotone_and_dominates() -> None:
    xs = _values()
    qs = xs[xs <= 1.0]
    for level in LEVELS:
        sig = np.array([sigma_down(float(x), level) for x in xs])
        q = np.array([q_up(float(x), level) for x in qs])
        assert np.all(sig <= xs) and np.all(np.diff(sig) >= 0)  # down, monotone
        assert np.all(q >= qs) and np.all(q <= 1.0) and np.all(np.diff(q) >= 0)
        ratio = GRID_RATIO ** (2**level)
        if level < 5:  # tight: the next point is above (below) the value
            assert np.all(sig * ratio * (1 + 1e-12) > xs)
            assert np.all((q / ratio) * (1 - 1e-12) < qs)
        # a grid point rounds to itself; coarser levels are sub-grids and dominate
        assert all(
            sigma_down(s, level) == s and q_up(min(s, 1.0), level) == min(s, 1.0) for s in sig
        )
        if level < MAX_LEVEL:
            assert np.all(np.array([sigma_down(float(x), level + 1) for x in xs]) <= sig)
            assert np.all(np.array([q_up(float(x), level + 1) for x in qs]) >= q)
    assert sigma_down(1.0) == 1.0 and q_up(1.0) == 1.0  # anchored at 1
    assert sigma_down(0.0) == 0.0 and math.isinf(sigma_down(math.inf))
    assert sigma_down(1.3, EXACT) == 1.3 and q_up(0.3, EXACT) == 0.3
    for e in [Event(0.013, 1.37), Event(1.0, 0.7), Event(0.5, math.inf)]:
        for level in LEVELS:
            assert dominates(grid_event(e, level), e)
    with pytest.raises(ValueError, match="grid level"):
        sigma_down(1.0, MAX_LEVEL + 1)


def test_compression_levels_and_counts() -> None:
    decay = [Event(0.01, 2.0 * 0.5 ** (t / 1000)) for t in range(1000)]
    free = Event(0.3, math.inf, 5)
    events = [*decay, free]
    assert ledger_level(events, None) == EXACT and ledger_level(events, 1000) == EXACT
    assert ledger_level(events, 64) == 0  # 2 -> 1 spans 45 level-0 points
    for limit in (64, 8, 2, 1):
        level = ledger_level(events, limit)
        out = compress(events, level)
        costly = [e for e in out if not math.isinf(e.noise_multiplier)]
        assert len(costly) <= limit and len({e.key for e in out}) == len(out)
        assert sum(e.steps for e in out) == sum(e.steps for e in events)
        assert free in out  # free steps stay as they are
        for e in events:  # each entry lands on a point that dominates it
            g = grid_event(e, level)
            assert dominates(g, e) and any(o.key == g.key for o in out)
    assert ledger_level(events, 8) > ledger_level(events, 64)
    assert compress(events, EXACT) == events
    assert "exact" in describe(EXACT) and "gridded" in describe(0)
    assert gap_estimate(EXACT) == 0 and 0.03 < gap_estimate(0) < 0.032


def _heterogeneous() -> list[Event]:
    """24 distinct mechanisms, q and sigma both varying (10 points on the level-0 grid)."""
    return [Event(0.02 * (1 + 0.002 * t), 1.2 * 0.995**t, 5 + t % 3) for t in range(24)]


def test_gridded_pld_epsilon_is_an_upper_bound_within_the_stated_gap() -> None:
    events = _heterogeneous()
    exact_acc = PldAccountant(max_exact_mechanisms=None)
    gridded_acc = PldAccountant(max_exact_mechanisms=12)
    assert exact_acc.grid_level(events) == EXACT and gridded_acc.grid_level(events) == 0
    assert len(gridded_acc.composed_events(events)) <= 12
    exact = exact_acc.epsilon(events, DELTA)
    gridded = gridded_acc.epsilon(events, DELTA)
    assert exact < gridded <= exact * (1 + gap_estimate(0))
    # the default keeps the exact path for a small ledger; delta is gridded alike
    assert PldAccountant().epsilon(events, DELTA) == exact
    assert gridded_acc.delta(events, exact) >= exact_acc.delta(events, exact)


def test_gridded_prv_composes_the_gridded_events() -> None:
    events = _heterogeneous()
    acc = PrvAccountant(max_exact_mechanisms=12)
    assert acc.grid_level(events) == 0 and PrvAccountant().max_exact_mechanisms == 16
    assert PrvAccountant(max_exact_mechanisms=64).grid_level(events) == EXACT
    gridded = acc.epsilon(events, DELTA)
    pld = PldAccountant(max_exact_mechanisms=None).epsilon(acc.composed_events(events), DELTA)
    assert math.isclose(gridded, pld, rel_tol=0.01)  # PRV and PLD of the same gridded events
    assert gridded >= PldAccountant(max_exact_mechanisms=None).epsilon(events, DELTA)
    with pytest.raises(ValueError, match="max_exact_mechanisms"):
        PrvAccountant(max_exact_mechanisms=0)


def test_rdp_is_unaffected() -> None:
    """RDP adds per-step curves: exact whatever the number of distinct mechanisms."""
    acc = RdpAccountant()
    assert not hasattr(acc, "grid_level")
    decay = [Event(0.01, 2.0 * 0.5 ** (t / 300)) for t in range(300)]
    eps = acc.epsilon(decay, DELTA)
    assert math.isclose(eps, acc.ledger_epsilon(Ledger(decay), DELTA), rel_tol=1e-12)
    assert eps < acc.epsilon([grid_event(e, 0) for e in decay], DELTA)
