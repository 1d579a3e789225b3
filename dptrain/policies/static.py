"""Static DP-SGD (Abadi et al. 2016): fixed clipping and fixed noise.

With ``G`` groups and total threshold ``C``, each group is clipped at ``C_g = C / sqrt(G)``
(flat clipping is ``G = 1``), so a sample moves the concatenated clipped sum by at most ``C``.
Every group receives noise of std ``sigma * C``: one Gaussian mechanism with noise multiplier
``sigma`` (``sum_g (C_g / (sigma C))^2 = 1 / sigma^2``).  Accountant event per step:
Poisson-subsampled Gaussian ``(q, sigma)``.

``noise_multiplier=0`` (optionally with ``clip=inf``: no clipping) is a non-private baseline:
its events have sigma = 0, which every accountant reports as epsilon = inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from accountants import Event

from .base import FrozenMap, Policy, StepContext, StepPlan


def split_clip(
    groups: Sequence[str], clip: float, group_clip: dict[str, float] | None = None
) -> dict[str, float]:
    """Per-group thresholds ``C_g`` for a total ``C``: ``C / sqrt(G)`` each, or the given
    ``group_clip`` values with the groups it does not name sharing the rest of ``C^2`` evenly
    (``sqrt((C^2 - sum_named C_g^2) / missing)``), so that ``sum_g C_g^2 = C^2`` whenever some
    group is left to share."""
    groups = list(groups)
    group_clip = dict(group_clip or {})
    unknown = set(group_clip) - set(groups)
    if unknown:
        raise ValueError(
            f"group_clip names unknown groups {sorted(unknown)}; the groups are {groups}"
        )
    bad = {g: c for g, c in group_clip.items() if not c >= 0}
    if bad:
        raise ValueError(f"group_clip values must be >= 0 (0: the group is not trained), got {bad}")
    if not group_clip:
        return dict.fromkeys(groups, float(clip) / math.sqrt(len(groups)))
    missing = [g for g in groups if g not in group_clip]
    rest = clip**2 - sum(c**2 for c in group_clip.values())
    if missing and rest <= 0:
        raise ValueError("group_clip uses up the whole clip norm; raise clip or list every group")
    each = math.sqrt(rest / len(missing)) if missing else 0.0
    return {g: float(group_clip.get(g, each)) for g in groups}


class StaticPolicy(Policy):
    """Fixed clip ``C`` (split evenly over groups) and fixed noise multiplier ``sigma``."""

    name = "static"
    frozen_settings = Policy.frozen_settings | {"clip", "group_clip"}

    def __init__(
        self,
        clip: float = 1.0,
        noise_multiplier: float | None = None,
        group_clip: dict[str, float] | None = None,
    ) -> None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.clip = float(clip)
        self.noise_multiplier = noise_multiplier  # None until calibrated
        self.group_clip = dict(group_clip or {})

    def bind(
        self, groups: Sequence[str], *, sample_rate: float, expected_batch_size: float
    ) -> None:
        super().bind(groups, sample_rate=sample_rate, expected_batch_size=expected_batch_size)
        # immutable from here: the plan's maps are these, and a mutation would change the clip
        # of every later step but not the forecasts (planned_event) nor describe()
        self.group_clip = FrozenMap(self.group_clip)
        self._clip = FrozenMap(split_clip(self.groups, self.clip, self.group_clip))
        if self.group_clip:
            self.clip = math.sqrt(sum(c**2 for c in self._clip.values()))
        if self.noise_multiplier is None:
            raise ValueError(
                "set noise_multiplier, or call calibrate() with a target epsilon, before binding"
            )
        if math.isinf(self.clip) and self.noise_multiplier != 0:
            raise ValueError(
                "clip=inf (no clipping) has unbounded sensitivity: only noise_multiplier=0 "
                "(a non-private baseline, epsilon = inf) is meaningful with it"
            )
        # sigma = 0: no noise (even with clip = inf, where sigma * C would be nan)
        std = self.noise_multiplier * self.clip if self.noise_multiplier else 0.0
        self._plan = StepPlan(clip=self._clip, noise_std=FrozenMap(dict.fromkeys(self.groups, std)))

    @property
    def charged_sigma(self) -> float:
        """The sigma each step is charged at: once bound, the plan's ``sigma_eff = 1 /
        sqrt(sum_g (C_g / (sigma C))^2)``, which rounds to within an ulp of ``noise_multiplier``
        (1.2 over three groups gives 1.1999999999999997), as :meth:`event` charges it; before
        bind (no groups yet), ``noise_multiplier``.  Forecasts read it, so that they equal the
        charge bitwise."""
        plan = self.__dict__.get("_plan") if self.bound else None
        return self.noise_multiplier if plan is None else self.event(plan).noise_multiplier

    def planned_event(self, sample_rate: float) -> Event:
        return Event(sample_rate=sample_rate, noise_multiplier=self.charged_sigma)

    def plan(self, context: StepContext) -> StepPlan:
        return self._plan

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "group_clip": dict(self._clip) if len(self._clip) > 1 else None,
        }
