"""Clipping and noise policies behind one interface, looked up by name in one registry."""

from __future__ import annotations

from .base import FrozenPolicyError, NoiseFn, Policy, RunContext, StepContext, StepPlan, StepSums
from .error_feedback import ErrorFeedbackOptions, ErrorFeedbackPolicy
from .registry import (
    POLICIES,
    PolicySpec,
    accountant_refusal,
    check_accountant,
    make_policy,
    policy_from_recipe,
    policy_spec,
    register_policy,
)
from .rl import RLOptions, make_rl_policy
from .static import StaticPolicy

register_policy("static", StaticPolicy)
register_policy("error_feedback", ErrorFeedbackPolicy, options=ErrorFeedbackOptions)
# the rl factory imports stable-baselines3 lazily, so its traits are stated here
register_policy("rl", make_rl_policy, options=RLOptions, adaptive=True, needs_public_data=True)

__all__ = [
    "POLICIES",
    "ErrorFeedbackPolicy",
    "FrozenPolicyError",
    "NoiseFn",
    "Policy",
    "PolicySpec",
    "RunContext",
    "StaticPolicy",
    "StepContext",
    "StepPlan",
    "StepSums",
    "accountant_refusal",
    "check_accountant",
    "make_policy",
    "policy_from_recipe",
    "policy_spec",
    "register_policy",
]
