"""The privacy contract of a step plan: ``sigma_eff = 1 / sqrt(sum_g (C_g / s_g)^2)`` over
exactly the engine's groups, with valid thresholds and noise."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dptrain.engine import PrivacyEngine
from dptrain.losses import mse_loss
from dptrain.policies import StaticPolicy, StepPlan


def test_zero_clip_group_does_not_hide_a_noiseless_group():
    # group a releases nothing (C=0), group b is clipped at 1 with no noise: not private
    plan = StepPlan(clip={"a": 0.0, "b": 1.0}, noise_std={"a": 0.0, "b": 0.0})
    assert plan.noise_multiplier == 0.0


def test_zero_clip_groups_are_skipped():
    plan = StepPlan(clip={"a": 0.0, "b": 3.0, "c": 4.0}, noise_std={"a": 0.0, "b": 2.0, "c": 2.0})
    assert plan.noise_multiplier == pytest.approx(2.0 / 5.0)
    only_zero = StepPlan(clip={"a": 0.0}, noise_std={"a": 0.0})
    assert only_zero.noise_multiplier == math.inf  # nothing private is released


@pytest.mark.parametrize(
    ("clip", "std"),
    [
        ({"a": -1.0}, {"a": 1.0}),
        ({"a": math.nan}, {"a": 1.0}),
        ({"a": 1.0}, {"a": -1.0}),
        ({"a": 1.0}, {"a": math.nan}),
        ({"a": 1.0}, {"b": 1.0}),
    ],
)
def test_invalid_plans_are_refused(clip, std):
    with pytest.raises(ValueError, match="plan"):
        StepPlan(clip=clip, noise_std=std)


def test_static_zero_group_clip_with_no_noise_is_charged_as_non_private():
    policy = StaticPolicy(clip=1.0, noise_multiplier=0.0, group_clip={"a": 0.0})
    policy.bind(["a", "b"], sample_rate=0.1, expected_batch_size=1.0)
    plan = policy.plan(None)
    assert plan.clip == {"a": 0.0, "b": 1.0}
    assert policy.event(plan).noise_multiplier == 0.0


def test_negative_group_clip_is_refused():
    policy = StaticPolicy(clip=1.0, noise_multiplier=1.0, group_clip={"a": -0.5})
    with pytest.raises(ValueError, match="group_clip"):
        policy.bind(["a", "b"], sample_rate=0.1, expected_batch_size=1.0)


class _WrongGroups(StaticPolicy):
    """Plans for a group the engine does not have (and none for the one it has)."""

    def plan(self, context):
        return StepPlan(clip={"other": 1.0}, noise_std={"other": 1.0})


def test_engine_refuses_a_plan_for_other_groups():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(
        model,
        opt,
        policy=_WrongGroups(clip=1.0, noise_multiplier=1.0),
        sample_rate=0.5,
        dataset_size=4,
        loss_fn=mse_loss,
    )
    batch = (torch.randn(2, 3), torch.randn(2, 1))
    with pytest.raises(ValueError, match="groups"):
        engine.step(batch)
    assert engine.ledger.total_steps == 0
