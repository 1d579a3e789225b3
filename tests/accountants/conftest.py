"""Shared fixtures: reference computations cached for the whole test session."""

from __future__ import annotations

import functools

import pytest

from accountants import Event, PldAccountant, PrvAccountant

DELTA = 1e-5

# (q, sigma, steps) lists: covers q in [1e-3, 1], sigma in [0.5, 10], 1..10^4 steps and
# heterogeneous schedules, at epsilon between 0.17 and 10 (see test_prv_pld.py).
GRID: list[tuple[tuple[float, float, int], ...]] = [
    ((1e-3, 0.6, 300),),
    ((0.01, 2.0, 10000),),
    ((0.01, 0.5, 1),),
    ((0.05, 0.7, 100),),
    ((0.1, 3.0, 10),),
    ((0.2, 5.0, 1000),),
    ((1.0, 5.0, 100),),
    ((1.0, 10.0, 1),),
    ((0.01, 1.0, 500), (0.01, 2.0, 500)),
    ((0.1, 3.0, 10), (1.0, 10.0, 1), (0.01, 1.0, 100)),
]


def events_of(spec: tuple[tuple[float, float, int], ...]) -> list[Event]:
    return [Event(q, s, n) for q, s, n in spec]


@functools.cache
def fine_pld_epsilon(spec: tuple[tuple[float, float, int], ...], delta: float = DELTA) -> float:
    """dp_accounting's pessimistic PLD at a fine discretization: min(1e-4, h/5), h being the
    interval the pld accountant would use (h/5 matters only for tiny per-step losses)."""
    events = events_of(spec)
    h = PldAccountant().interval_for([e.key for e in events])
    return PldAccountant(min(1e-4, h / 5)).epsilon(events, delta)


_PRV = PrvAccountant()


@functools.cache
def prv_bounds(
    spec: tuple[tuple[float, float, int], ...], delta: float = DELTA
) -> tuple[float, float]:
    """(lower, upper) epsilon bounds of the prv-accountant library (our accountant's grid)."""
    return _PRV.epsilon_bounds(events_of(spec), delta)


@pytest.fixture(scope="session")
def prv() -> PrvAccountant:
    return _PRV
