"""BudgetFilter: never allows a step past the budget, exact max_steps, cheap per-step checks."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accountants import (
    UNLIMITED,
    Budget,
    BudgetFilter,
    Event,
    Ledger,
    get_accountant,
)

DELTA = 1e-5
# a small palette so that per-mechanism RDP curves are computed once per session
PALETTE = [(0.01, 1.0), (0.01, 2.0), (0.05, 0.8), (0.1, 5.0), (1.0, 20.0), (0.003, 0.6)]

event_st = st.builds(
    lambda m, steps: Event(m[0], m[1], steps),
    st.sampled_from(PALETTE),
    st.integers(min_value=1, max_value=400),
)


proposal_st = st.tuples(event_st, st.sampled_from(["as_is", "as_is", "fill", "fill+1"]))


def _simulate(fil: BudgetFilter, proposals: list[tuple[Event, str]]) -> None:
    """Propose events to the filter; "fill" proposes exactly max_steps of the mechanism and
    "fill+1" one more, so the budget boundary itself is exercised."""
    acc = fil.accountant
    eps = acc.adaptive_epsilon if fil.adaptive else acc.epsilon  # type: ignore[attr-defined]
    ledger = Ledger()
    for event, mode in proposals:
        if mode != "as_is":
            fits = fil.max_steps(ledger, event)
            event = event.with_steps(max(1, fits + (mode == "fill+1")))
        allowed = fil.allows(ledger, event)
        if allowed:
            ledger.record(event)
            assert eps(ledger.events, DELTA) <= fil.budget.epsilon
            assert fil.spent(ledger) == eps(ledger.events, DELTA)
        else:  # refusals are exact too: the step would really have exceeded the budget
            assert eps([*ledger.events, event], DELTA) > fil.budget.epsilon


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.floats(min_value=0.3, max_value=10.0),
    proposals=st.lists(proposal_st, min_size=1, max_size=25),
    adaptive=st.booleans(),
)
def test_rdp_filter_never_allows_exceeding(
    budget: float, proposals: list[tuple[Event, str]], adaptive: bool
) -> None:
    _simulate(BudgetFilter(Budget(budget, DELTA), "rdp", adaptive=adaptive), proposals)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.floats(min_value=0.5, max_value=8.0),
    mechanism=st.sampled_from(PALETTE[:4]),
    prefix=st.lists(event_st, max_size=4),
)
def test_rdp_max_steps_is_exact(budget: float, mechanism, prefix: list[Event]) -> None:
    fil = BudgetFilter(Budget(budget, DELTA), "rdp")
    ledger = Ledger(prefix)
    event = Event(*mechanism)
    m = fil.max_steps(ledger, event)
    events = ledger.events
    acc = fil.accountant
    if m > 0:
        assert acc.epsilon([*events, event.with_steps(m)], DELTA) <= budget
        assert fil.allows(ledger, event.with_steps(m))
    assert not fil.allows(ledger, event.with_steps(m + 1))
    assert acc.epsilon([*events, event.with_steps(m + 1)], DELTA) > budget


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.floats(min_value=0.05, max_value=12.0),
    mechanism=st.sampled_from(PALETTE),
    prefix=st.lists(event_st, max_size=4),
    adaptive=st.booleans(),
)
def test_rdp_closed_form_guess_gives_the_searched_answer_in_two_probes(
    budget: float, mechanism, prefix: list[Event], adaptive: bool
) -> None:
    """The filter's first guess for RDP (steps_estimate: each order's bound is linear in the
    step count) is confirmed by two probes, and the answer is the plain search's."""
    from accountants.budget import largest_within
    from accountants.rdp import RdpAccountant

    acc, event = RdpAccountant(), Event(*mechanism)
    probes = []
    f = acc.steps_evaluator(prefix, event, DELTA, adaptive=adaptive)

    def counted(k: int) -> float:
        probes.append(k)
        return f(k)

    plain = largest_within(f, budget)
    guess = acc.steps_estimate(prefix, event, DELTA, budget, adaptive=adaptive)
    assert guess is not None
    assert largest_within(counted, budget, guess=guess, exact_guess=True) == plain
    if plain >= 0:  # the non-adaptive conversion's KL shortcut can only add steps
        assert guess == plain or (not adaptive and guess < plain)
        if guess == plain:
            assert len(probes) == 2
    fil = BudgetFilter(Budget(budget, DELTA), acc, adaptive=adaptive)
    assert fil.max_steps(Ledger(prefix), event) == max(0, plain)


@pytest.mark.parametrize("name", ["pld", "prv"])
def test_max_steps_exact_and_countdown(name: str) -> None:
    budget = Budget(1.0, DELTA)
    fil = BudgetFilter(budget, name)
    acc = get_accountant(name)
    event = Event(0.05, 1.5)
    ledger = Ledger([Event(0.05, 3.0, 20)])  # a prefix of another mechanism
    m = fil.max_steps(ledger, event)
    assert 10 < m < 1000
    prefix = ledger.events
    assert acc.epsilon([*prefix, event.with_steps(m)], DELTA) <= budget.epsilon
    assert acc.epsilon([*prefix, event.with_steps(m + 1)], DELTA) > budget.epsilon
    # the training loop: one check per step, answered from the cache by counting down
    start = time.perf_counter()
    for _ in range(m - 2):
        assert fil.allows(ledger, event)
        ledger.record(event)
    assert time.perf_counter() - start < 0.5
    for _ in range(2):  # the last steps, checked against the accountant itself
        assert fil.allows(ledger, event)
        ledger.record(event)
        assert acc.epsilon(ledger.events, DELTA) <= budget.epsilon
    assert fil.max_steps(ledger, event) == 0
    assert not fil.allows(ledger, event)


def test_allows_is_cheap_per_step() -> None:
    fil = BudgetFilter(Budget(8.0, DELTA), "rdp")
    ledger = Ledger()
    event = Event(0.01, 0.8)
    assert fil.allows(ledger, event)  # the first query computes the curve once
    ledger.record(event)
    start = time.perf_counter()
    steps = 1
    while fil.allows(ledger, event):
        ledger.record(event)
        steps += 1
    elapsed = time.perf_counter() - start
    # a counter decides: ~microseconds per step (a bound with room for a loaded CI machine;
    # recomputing the composition would cost milliseconds per step)
    assert steps > 3000 and elapsed / steps < 5e-4
    assert fil.spent(ledger) <= 8.0


def test_refuses_when_already_spent() -> None:
    fil = BudgetFilter(Budget(1.0, DELTA), "rdp")
    ledger = Ledger([Event(0.1, 1.0, 1000)])  # recorded without a filter: far over budget
    spent = fil.spent(ledger)
    assert spent > 1.0
    for event in (Event(0.01, 100.0), Event(0.1, 1.0), Event(0.5, math.inf)):
        assert not fil.allows(ledger, event)
        assert fil.max_steps(ledger, event) == 0


def test_free_and_infinitely_expensive_steps() -> None:
    fil = BudgetFilter(Budget(1.0, DELTA), "rdp")
    ledger = Ledger([Event(0.01, 2.0, 10)])
    assert fil.spent(ledger) < 1.0
    assert fil.max_steps(ledger, Event(0.01, math.inf)) == UNLIMITED
    assert fil.allows(ledger, Event(0.01, math.inf, 10**9))
    assert fil.max_steps(ledger, Event(0.01, 0.0)) == 0
    assert not fil.allows(ledger, Event(0.01, 0.0))


def test_cache_follows_the_ledger() -> None:
    fil = BudgetFilter(Budget(2.0, DELTA), "rdp")
    event = Event(0.01, 1.0)
    a, b = Ledger(), Ledger([Event(0.02, 1.0, 300)])
    fresh = fil.max_steps(a, event)
    assert fil.max_steps(b, event) < fresh  # a different ledger is not confused with `a`
    a.record(event.with_steps(5))
    assert fil.max_steps(a, event) == fresh - 5
    a.record(Event(0.02, 1.0, 1))  # a new prefix: recomputed
    expected = BudgetFilter(Budget(2.0, DELTA), "rdp").max_steps(Ledger(a.events), event)
    assert fil.max_steps(a, event) == expected < fresh - 5


def test_adaptive_mode() -> None:
    plain = BudgetFilter(Budget(4.0, DELTA), "rdp")
    adaptive = BudgetFilter(Budget(4.0, DELTA), "rdp", adaptive=True)
    event = Event(0.01, 1.0)
    assert adaptive.max_steps(Ledger(), event) < plain.max_steps(Ledger(), event)
    for name in ("prv", "pld"):
        with pytest.raises(ValueError, match=f"'{name}' accountant is not valid under adaptive"):
            BudgetFilter(Budget(4.0, DELTA), name, adaptive=True)


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="delta"):
        Budget(1.0, 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        Budget(-1.0, DELTA)
    with pytest.raises(TypeError):
        BudgetFilter((1.0, DELTA))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown accountant"):
        BudgetFilter(Budget(1.0, DELTA), "moments")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=st.floats(min_value=0.5, max_value=4.0),
    proposals=st.lists(
        st.tuples(
            st.builds(
                lambda m, steps: Event(m[0], m[1], steps),
                st.sampled_from([(0.01, 1.0), (0.05, 2.0), (1.0, 20.0)]),
                st.integers(min_value=1, max_value=300),
            ),
            st.sampled_from(["as_is", "fill", "fill+1"]),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_pld_filter_never_allows_exceeding(
    budget: float, proposals: list[tuple[Event, str]]
) -> None:
    _simulate(BudgetFilter(Budget(budget, DELTA), "pld"), proposals)
