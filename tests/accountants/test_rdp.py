"""RDP accountant: equal to dp_accounting's RdpAccountant; edge cases; the adaptive conversion."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as DpRdp

from accountants import (
    ADAPTIVE_ORDERS,
    RDP_ORDERS,
    Event,
    RdpAccountant,
    UnsupportedEventError,
    get_accountant,
)

DELTA = 1e-5
RATES = (1e-3, 1e-2, 0.1, 1.0)
NOISES = (0.5, 1.0, 2.0, 10.0)
STEPS = (1, 100, 10_000)


def dp_reference(events: list[Event], delta: float = DELTA) -> tuple[float, float]:
    """dp_accounting's own composition of the same events: (epsilon(delta), delta(eps=1))."""
    acc = DpRdp(orders=RDP_ORDERS)
    acc.compose(
        dp_event.ComposedDpEvent(
            [
                dp_event.SelfComposedDpEvent(
                    dp_event.PoissonSampledDpEvent(
                        e.sample_rate, dp_event.GaussianDpEvent(e.noise_multiplier)
                    ),
                    e.steps,
                )
                for e in events
            ]
        )
    )
    return acc.get_epsilon(delta), acc.get_delta(1.0)


def assert_close(ours: float, ref: float, rel: float = 1e-6) -> None:
    if math.isinf(ref) or ref == 0:
        assert ours == ref
    else:
        assert abs(ours - ref) <= rel * abs(ref), (ours, ref)


@pytest.mark.parametrize(("q", "sigma"), list(itertools.product(RATES, NOISES)))
def test_matches_dp_accounting_on_grid(q: float, sigma: float) -> None:
    acc = RdpAccountant()
    for steps in STEPS:
        events = [Event(q, sigma, steps)]
        ref_eps, ref_delta = dp_reference(events)
        assert_close(acc.epsilon(events, DELTA), ref_eps)
        assert_close(acc.delta(events, 1.0), ref_delta)


@pytest.mark.parametrize(
    "spec",
    [
        [(0.01, 1.0, 500), (0.01, 2.0, 500)],
        [(1e-3, 0.5, 10_000), (1.0, 10.0, 3), (0.5, 2.0, 100)],
        [(0.01, 1.0, 10), (0.01, 1.0, 20), (0.02, 1.0, 5), (0.01, 1.0, 7)],  # merges
    ],
)
def test_heterogeneous_matches_dp_accounting(spec: list[tuple[float, float, int]]) -> None:
    events = [Event(q, s, n) for q, s, n in spec]
    ref_eps, ref_delta = dp_reference(events)
    acc = get_accountant("rdp")
    assert_close(acc.epsilon(events, DELTA), ref_eps)
    assert_close(acc.delta(events, 1.0), ref_delta)
    for delta in (1e-3, 1e-8):
        assert_close(acc.epsilon(events, delta), dp_reference(events, delta)[0])


def test_orders_are_documented_grid() -> None:
    assert len(RDP_ORDERS) == len(set(RDP_ORDERS)) == 206
    assert list(RDP_ORDERS) == sorted(RDP_ORDERS)
    assert RDP_ORDERS[0] == 1.05 and RDP_ORDERS[-1] == 1024
    assert all(a > 1.01 for a in ADAPTIVE_ORDERS) and len(ADAPTIVE_ORDERS) == 25


def test_edge_cases() -> None:
    acc = RdpAccountant()
    assert acc.epsilon([], DELTA) == 0.0
    assert acc.delta([], 1.0) == 0.0
    assert acc.epsilon([Event(0.1, math.inf, 1000)], DELTA) == 0.0
    assert acc.epsilon([Event(0.1, 0.0, 1)], DELTA) == math.inf
    assert acc.delta([Event(0.1, 0.0, 1)], 5.0) == 1.0
    free_then_paid = [Event(0.1, math.inf, 10), Event(0.01, 1.0, 100)]
    assert acc.epsilon(free_then_paid, DELTA) == acc.epsilon(free_then_paid[1:], DELTA)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon([Event(0.01, 1.0)], 0.0)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon([Event(0.01, 1.0)], 1.0)
    with pytest.raises(ValueError, match="epsilon"):
        acc.delta([Event(0.01, 1.0)], -1.0)


@pytest.mark.parametrize("name", ["rdp", "prv", "pld"])
def test_unsupported_kind_is_named(name: str) -> None:
    acc = get_accountant(name)
    with pytest.raises(UnsupportedEventError, match=r"'ef_custom'.*poisson_gaussian"):
        acc.epsilon([Event(0.01, 1.0, 10), Event(0.01, 1.0, kind="ef_custom")], DELTA)


def test_registry_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown accountant 'gdp'.*pld, prv, rdp"):
        get_accountant("gdp")
    for name in ("rdp", "prv", "pld"):
        acc = get_accountant(name)
        assert acc.name == name
        assert acc.adaptive_valid is (name == "rdp")


def test_adaptive_conversion_is_the_union_bound() -> None:
    acc = RdpAccountant()
    events = [Event(0.01, 1.0, 1000)]
    curve = acc.rdp(events, adaptive=True)
    a = np.asarray(ADAPTIVE_ORDERS)
    d = DELTA / len(a)
    expected = np.min(curve + np.log1p(-1 / a) - np.log(d * a) / (a - 1))
    assert acc.adaptive_epsilon(events, DELTA) == pytest.approx(expected, rel=1e-12)
    # the union bound is the price of adaptivity: never below the non-adaptive epsilon
    for spec in [(0.01, 1.0, 1000), (1.0, 10.0, 1), (1e-3, 0.7, 10_000), (0.1, 5.0, 50)]:
        ev = [Event(*spec)]
        assert acc.adaptive_epsilon(ev, DELTA) >= acc.epsilon(ev, DELTA)


def test_steps_evaluator_is_bitwise_consistent() -> None:
    acc = RdpAccountant()
    prefix = [Event(0.01, 1.0, 37), Event(0.02, 3.0, 5)]
    event = Event(0.01, 1.0)
    for adaptive in (False, True):
        f = acc.steps_evaluator(prefix, event, DELTA, adaptive=adaptive)
        direct = acc.adaptive_epsilon if adaptive else acc.epsilon
        assert f(0) == direct(prefix, DELTA)
        for k in (1, 2, 17, 1000):
            assert f(k) == direct([*prefix, event.with_steps(k)], DELTA)


def test_ledger_curve_is_incremental_and_bitwise_equal() -> None:
    """The curve kept per ledger equals rdp() of the same entries, as the ledger grows (new
    entries, steps added to the last one), for any prefix, in both order grids."""
    from accountants import Ledger

    acc = RdpAccountant()
    ledger = Ledger()
    for t in range(40):
        ledger.record(Event(0.01, 1.0 + 0.1 * (t % 3 == 0) + 0.01 * (t // 5)))
        for adaptive in (False, True):
            got = acc.ledger_rdp(ledger, adaptive=adaptive)
            assert np.array_equal(got, acc.rdp(ledger.events, adaptive=adaptive))
            n = len(ledger) - 1
            assert np.array_equal(
                acc.ledger_rdp(ledger, n, adaptive=adaptive),
                acc.rdp(ledger.events[:n], adaptive=adaptive),
            )
        assert acc.ledger_epsilon(ledger, DELTA) == acc.epsilon(ledger.events, DELTA)
        assert acc.ledger_epsilon(ledger, DELTA, adaptive=True) == acc.adaptive_epsilon(
            ledger.events, DELTA
        )
    other = Ledger(ledger.events[:3])  # another ledger keeps its own curve
    assert np.array_equal(acc.ledger_rdp(other), acc.rdp(other.events))
    assert np.array_equal(acc.ledger_rdp(ledger, 2), acc.rdp(ledger.events[:2]))
