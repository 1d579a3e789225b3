"""Clipping and noise policies behind one interface, looked up by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..recipe import register_policy_schema
from .base import NoiseFn, Policy, RunContext, StepContext, StepPlan, StepSums
from .error_feedback import ErrorFeedbackOptions, ErrorFeedbackPolicy
from .rl import RLOptions, make_rl_policy
from .static import StaticPolicy

POLICIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str, factory: Callable[..., Policy]) -> None:
    """Make ``factory(**options)`` available as ``policy: <name>`` in recipes and the API."""
    POLICIES[name] = factory


def make_policy(name: str, **options: Any) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}': choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**options)


register_policy("static", StaticPolicy)
register_policy("error_feedback", ErrorFeedbackPolicy)
register_policy_schema("error_feedback", ErrorFeedbackOptions)
register_policy("rl", make_rl_policy)
register_policy_schema("rl", RLOptions)

__all__ = [
    "POLICIES",
    "ErrorFeedbackPolicy",
    "NoiseFn",
    "Policy",
    "RunContext",
    "StaticPolicy",
    "StepContext",
    "StepPlan",
    "StepSums",
    "make_policy",
    "register_policy",
]
