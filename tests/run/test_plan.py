"""The file-level guarantee (dptrain.plan.file_level): what holds for a record added to the data
file when validation and public splits are drawn from it by key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from dptrain.plan import file_level
from dptrain.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[2]
EPS, DELTA = 2.0, 1e-5


def recipe(**data):
    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["data"] = {"path": "bundled:clinic_notes", "validation_fraction": 0.25, **data}
    return parse_recipe(d)


def test_validation_records_cost_nothing_while_their_perplexity_stays_private():
    level = file_level(recipe(), EPS, DELTA)
    assert (level["epsilon"], level["delta"]) == (EPS, DELTA)
    assert level["validation_probability"] == 0.25 and level["public_probability"] == 0
    assert "private/" in level["why"]


def test_a_record_that_may_be_declared_public_adds_that_probability_to_delta():
    level = file_level(recipe(public_fraction=0.1), EPS, DELTA)
    b = 0.75 * (2**64 * 0.1 // 1) / 2**64  # the exact keyed threshold, after validation
    assert level["public_probability"] == pytest.approx(b, rel=1e-15)
    assert level["epsilon"] == EPS and level["delta"] == pytest.approx(DELTA + b)
    assert "declared public" in level["why"]


def test_max_records_is_group_privacy_and_the_swapped_record_may_be_public():
    group = (1 + math.exp(EPS)) * DELTA
    level = file_level(recipe(max_records=100), EPS, DELTA)
    assert level["epsilon"] == 2 * EPS and level["delta"] == pytest.approx(group)
    level = file_level(recipe(max_records=100, public_fraction=0.1), EPS, DELTA)
    assert level["delta"] == pytest.approx(group + 0.75 * 0.1 + 0.1)


def test_a_separate_validation_file_leaves_the_training_split_the_whole_file():
    separate = recipe(
        path="bundled:clinic_notes:train", validation_path="bundled:clinic_notes:validation"
    )
    level = file_level(separate, EPS, DELTA)
    assert (level["epsilon"], level["delta"], level["validation_probability"]) == (EPS, DELTA, 0)
    assert "whole file" in level["why"]
    assert file_level(recipe(public_fraction=0.5), math.inf, DELTA)["delta"] == 1.0


def test_a_run_and_a_federated_round_share_one_fit_check():
    """check_run and a client's round both ask steps_that_fit: the most further steps of the
    planned event within the budget (n fit, n + 1 do not), None for an adaptive policy."""
    from accountants import BudgetFilter, Event, Ledger, get_accountant
    from dptrain.federated.client import ClientPlan, _over_budget
    from dptrain.plan import check_run, plan_privacy, steps_that_fit

    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["policy"]["noise_multiplier"] = 1.0
    plan = plan_privacy(parse_recipe(d), 400)
    ledger = Ledger([Event(plan.sample_rate, 1.0, 5)])
    fil = BudgetFilter(plan.budget, plan.accountant)
    event, n = steps_that_fit(plan.policy, plan.sample_rate, fil, ledger, 10**9)
    assert 0 < n < 10**9
    assert check_run(plan, public_records=None, ledger=ledger) == min(n, plan.steps - 5)
    assert steps_that_fit(plan.policy, plan.sample_rate, fil, ledger, n - 1) == (event, n - 1)
    rdp = get_accountant("rdp")
    for steps, fits in ((5 + n, True), (6 + n, False)):
        eps = rdp.epsilon([event.with_steps(steps)], plan.delta)
        assert (eps <= plan.budget.epsilon) == fits
    spent = fil.spent(ledger)
    for local, declined in ((n, False), (n + 1, True)):
        client = ClientPlan(0, None, plan.sample_rate, plan.delta, local, d["privacy"]["epsilon"],
                            plan.policy, None)  # fmt: skip
        reason = _over_budget(client, ledger, fil, spent)
        assert (reason is not None) == declined
    assert f"{n} more fit" in reason
    adaptive = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    adaptive["policy"] = {"name": "rl", "clip": 1.0}
    rl_plan = plan_privacy(parse_recipe(adaptive), 400)
    assert steps_that_fit(rl_plan.policy, rl_plan.sample_rate, fil, ledger, n) is None


def test_a_loose_prv_budget_is_checked_up_to_the_planned_steps():
    """epsilon 10^6 fits ~10^10 steps: PRV cannot compose that many (it ran out of memory
    before the search was capped); the fit check only asks for the planned steps."""
    from accountants import Ledger
    from dptrain.plan import check_run, plan_privacy

    d = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    d["policy"]["noise_multiplier"] = 1.0
    d["privacy"].update(epsilon=1e6, accountant="prv")
    plan = plan_privacy(parse_recipe(d), 400)
    assert check_run(plan, public_records=None, ledger=Ledger()) == plan.steps
