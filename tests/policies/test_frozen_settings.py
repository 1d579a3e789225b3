"""One rule for every policy: once bound, its privacy settings are read-only, so the steps'
plans, their charges and ``planned_event`` (pre-run checks, forecasts, the federated planned
round) all read one value."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from torch import nn

import accountants
from accountants import Budget, BudgetFilter, Ledger
from dptrain.engine import PrivacyEngine
from dptrain.losses import mse_loss
from dptrain.plan import plan_privacy, steps_that_fit
from dptrain.policies import (
    ErrorFeedbackPolicy,
    FrozenPolicyError,
    StaticPolicy,
    StepPlan,
    error_feedback,
)
from dptrain.policies.rl import RLPolicy
from dptrain.policies.rl import policy as rl_policy
from dptrain.policies.rl.options import RLConfig
from dptrain.recipe import parse_recipe

Q, EB = 0.1, 4.0


def _policies():
    return [
        StaticPolicy(1.0, 1.2, {"a": 0.6}),
        ErrorFeedbackPolicy(1.0, 1.2, error_clip=0.05),
        RLPolicy(1.0, 1.2),
    ]


def _bound(policy):
    policy.bind(["a", "b"], sample_rate=Q, expected_batch_size=EB)
    return policy


# every declared setting of each kind, and a value that differs from the bound one
CHANGES = {
    "static": {"noise_multiplier": 2.0, "clip": 0.5, "group_clip": {"a": 0.1}},
    "error_feedback": {"noise_multiplier": 2.0, "clip": 0.5, "error_clip": 0.2},
    "rl": {"noise_multiplier": 2.0, "clip": 0.5, "cfg": RLConfig(every=3), "count_std": 1.0},
}
BOUND = {"sample_rate": 0.5, "expected_batch_size": 9.0, "groups": ["a"], "adaptive": True}


@pytest.mark.parametrize("index", range(3))
def test_a_bound_policy_refuses_every_privacy_setting_with_the_fix(index):
    policy = _bound(_policies()[index])
    before = (policy.planned_event(Q), policy.describe())
    for name, value in {**CHANGES[policy.name], **BOUND}.items():
        assert name in policy.frozen_settings
        with pytest.raises(FrozenPolicyError, match=rf"{name} is frozen.*Fix: set {name} before"):
            setattr(policy, name, value)
    with pytest.raises(FrozenPolicyError, match=r"\(before bind\(\)\), or build a new policy"):
        policy.calibrate(1.0, 1e-5, sample_rate=Q, steps=10, accountant="rdp")
    assert (policy.planned_event(Q), policy.describe()) == before  # nothing changed
    policy.scratch = 1  # attributes outside the declared settings stay free


@pytest.mark.parametrize("index", range(2))
def test_the_planned_event_is_the_charge_of_every_step(index):
    """Static and error feedback: the one event planned ahead is what each step is charged,
    bitwise, also where the plan's sigma_eff = 1 / sqrt(sum_g (C_g / (sigma C))^2) rounds an
    ulp below sigma (1.2 over three groups: 1.1999999999999997)."""
    policy = _policies()[index]
    policy.group_clip = {}
    assert policy.planned_event(Q).noise_multiplier == 1.2  # before bind: no groups yet
    policy.bind(["a", "b", "c"], sample_rate=Q, expected_batch_size=EB)
    planned, charged = policy.planned_event(Q), policy.event(policy.plan(None))
    assert charged.noise_multiplier == 1.1999999999999997 and policy.noise_multiplier == 1.2
    assert planned == charged
    assert planned.noise_multiplier == charged.noise_multiplier  # Event's == is exact here
    # the pre-run fit check and the federated planned round read the same event
    fil = BudgetFilter(Budget(3.0, 1e-5), "rdp")
    event, fits = steps_that_fit(policy, Q, fil, Ledger(), 1000)
    assert event == charged and fil.spent(Ledger([event.with_steps(fits)])) <= 3.0


@pytest.mark.parametrize("index", range(3))
def test_settings_changed_before_bind_are_the_ones_planned(index):
    policy = _policies()[index]
    policy.noise_multiplier, policy.clip = 2.5, 0.8
    if policy.name == "error_feedback":
        policy.error_clip = 0.1
    policy.calibrate(3.0, 1e-5, sample_rate=Q, steps=20, accountant="rdp")  # before bind: allowed
    sigma = policy.noise_multiplier
    assert sigma != 2.5
    _bound(policy)
    assert (policy.noise_multiplier, policy.clip) == (sigma, 0.8)
    if policy.name != "rl":
        plan = policy.plan(None)
        assert plan.noise_multiplier == pytest.approx(sigma)
        assert policy.event(plan).noise_multiplier == pytest.approx(sigma, rel=1e-15)
        assert policy.planned_event(Q) == policy.event(plan)  # the charge, bitwise
        assert policy.describe()["noise_multiplier"] == sigma


def test_a_failed_bind_freezes_nothing_and_a_rebind_must_match():
    policy = StaticPolicy(1.0)  # no sigma yet: bind refuses
    with pytest.raises(ValueError, match="set noise_multiplier"):
        _bound(policy)
    assert not policy.bound
    policy.noise_multiplier = 1.5
    _bound(policy)
    plan = policy.plan(None)
    _bound(policy)  # the same constants: a no-op, the plan stays the bound one
    assert policy.plan(None) is plan
    with pytest.raises(FrozenPolicyError, match=r"sample rate 0\.2.*Fix: build a new policy"):
        policy.bind(["a", "b"], sample_rate=0.2, expected_batch_size=EB)
    assert policy.sample_rate == Q


class _Custom(StaticPolicy):
    """A subclass whose own bind assigns a frozen setting after super().bind (as static does)."""

    def bind(self, groups, *, sample_rate, expected_batch_size):
        super().bind(groups, sample_rate=sample_rate, expected_batch_size=expected_batch_size)
        self.clip = 2 * self.clip
        self._plan = StepPlan(
            clip=dict.fromkeys(self.groups, self.clip / math.sqrt(len(self.groups))),
            noise_std=dict.fromkeys(self.groups, self.noise_multiplier * self.clip),
        )


def test_a_subclass_bind_may_set_its_settings_and_then_they_freeze():
    policy = _bound(_Custom(1.0, 1.0))
    assert policy.clip == 2.0
    with pytest.raises(FrozenPolicyError, match="clip is frozen"):
        policy.clip = 1.0


def test_the_engine_freezes_its_policy():
    model = nn.Linear(3, 1)
    policy = StaticPolicy(1.0, 1.0)
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        policy=policy,
        sample_rate=0.5,
        dataset_size=4,
        loss_fn=mse_loss,
        budget=Budget(10.0, 1e-5),
    )
    with pytest.raises(FrozenPolicyError, match="before the engine is built"):
        engine.policy.noise_multiplier = 0.1  # would under-report every forecast


def test_rl_config_is_immutable_and_copies_with_updates():
    cfg = RLConfig(every=3)
    with pytest.raises(AttributeError, match=r"rl\.every .*Fix: .*model_copy"):
        cfg.every = 4
    assert cfg.model_copy(update={"every": 4}).every == 4
    assert cfg.every == 3


def test_a_restored_sigma_is_set_before_bind_and_planned():
    """Resume: the run plan puts run.json's sigma on the fresh policy before the engine binds."""
    recipe = parse_recipe(
        {
            "name": "t",
            "model": {"name": "tiny"},
            "data": {"path": "d.jsonl"},
            "training": {"steps": 5, "batch_size": 4},
            "privacy": {"epsilon": 2.0, "delta": 1e-5},
        }
    )
    plan = plan_privacy(recipe, 100, restored_noise=1.75)
    assert plan.noise_source == "restored"
    _bound(plan.policy)
    assert plan.policy.planned_event(Q).noise_multiplier == 1.75
    assert plan.policy.plan(None).noise_multiplier == pytest.approx(1.75)


@pytest.mark.parametrize("index", range(3))
def test_a_bound_policy_refuses_mutating_its_containers(index):
    """Assignment and in-place mutation alike: group_clip, the groups, the plan's maps, rl's
    bands and its config's lists."""
    policy = _bound(_policies()[index])
    before = (policy.planned_event(Q), policy.describe())
    with pytest.raises(AttributeError):
        policy.groups.append("c")
    if policy.name == "rl":
        with pytest.raises(AttributeError):
            policy.cfg.net_arch.append(8)
        with pytest.raises(AttributeError):
            policy.bands[0].append("c")
        with pytest.raises(FrozenPolicyError, match=r"read-only.*Fix: give the values before"):
            policy.band_of["a"] = 1
    else:
        plan = policy.plan(None)
        for mapping in (policy.group_clip, plan.clip, plan.noise_std):
            with pytest.raises(FrozenPolicyError, match=r"read-only.*Fix: give the values before"):
                mapping["a"] = 0.1
            for mutate in (mapping.clear, lambda m=mapping: m.update(a=0.1)):
                with pytest.raises(FrozenPolicyError):
                    mutate()
        if policy.name == "static":
            assert policy.plan(None).clip == {"a": 0.6, "b": 0.8}
        reported = policy.describe()
        assert json.loads(json.dumps(reported)) == reported  # run.json still takes it
        assert copy.deepcopy(plan) == plan and pickle.loads(pickle.dumps(plan)) == plan
    assert (policy.planned_event(Q), policy.describe()) == before


@pytest.mark.parametrize("index", range(3))
def test_calibrate_on_a_bound_policy_is_refused_before_any_work(index, monkeypatch):
    """No sigma is computed (error feedback's takes seconds): calibrate_noise, which static and
    error feedback call, and rl's Pacer are never reached."""
    calls: list[str] = []

    def counted(real, name):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(accountants, "calibrate_noise", counted(accountants.calibrate_noise, "s"))
    monkeypatch.setattr(
        error_feedback, "calibrate_noise", counted(error_feedback.calibrate_noise, "ef")
    )
    monkeypatch.setattr(rl_policy, "Pacer", counted(rl_policy.Pacer, "rl"))
    fresh = _policies()[index]
    fresh.calibrate(3.0, 1e-5, sample_rate=Q, steps=5, accountant="rdp")
    assert len(calls) == 1  # the counters see an unbound policy's calibration
    policy = _bound(_policies()[index])
    with pytest.raises(FrozenPolicyError, match=r"noise_multiplier is frozen.*calibrated now"):
        policy.calibrate(3.0, 1e-5, sample_rate=Q, steps=5, accountant="rdp")
    assert len(calls) == 1 and policy.noise_multiplier == 1.2
