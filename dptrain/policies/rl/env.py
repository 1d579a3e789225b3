"""The training loop as a ``gymnasium`` environment: one env step = one decision interval.

``PrivateTrainingEnv(policy, advance)`` exposes an :class:`~dptrain.policies.rl.RLPolicy` bound
to a :class:`~dptrain.PrivacyEngine`: ``step(action)`` applies the action, calls
``advance(n)`` to run the ``n`` private steps up to the next decision (``advance`` returns how
many it took: fewer when the budget filter refused a step) and returns the next observation,
the reward, and ``terminated`` once the planned steps are done or the budget is spent.  With
``advance`` it can be driven by any agent, ``stable_baselines3.SAC.learn`` included.

``dptrain train`` keeps its own loop (checkpoints, resume and the budget stop stay the same for
every policy), so there the policy makes the same decisions itself and feeds the transitions
to its agent; the environment then only carries the spaces (``advance=None``).

Private training cannot be rewound: ``reset()`` returns the current observation without
undoing steps or spent privacy, and the spec is marked non-deterministic (DP noise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec

from .control import OBS_BOUND, action_dim, obs_dim

if TYPE_CHECKING:
    from .policy import RLPolicy


class PrivateTrainingEnv(gym.Env):
    """Decision intervals of a private training run (see the module docstring)."""

    metadata = {"render_modes": []}  # noqa: RUF012

    def __init__(self, policy: RLPolicy, advance: Callable[[int], int] | None = None) -> None:
        n_bands = len(policy.bands)
        self.policy = policy
        self.advance = advance
        if advance is not None:
            policy.driver = "env"
        self.spec = EnvSpec("dptrain/PrivateTraining-v0", nondeterministic=True)
        self.observation_space = spaces.Box(
            -OBS_BOUND, OBS_BOUND, (obs_dim(n_bands),), dtype=np.float32
        )
        self.action_space = spaces.Box(-1.0, 1.0, (action_dim(n_bands),), dtype=np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return self.policy.observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.advance is None:
            raise RuntimeError(
                "this environment only carries the spaces of a run driven by dptrain train; "
                "pass advance= (a function running n private steps) to step it"
            )
        self.policy.apply(np.asarray(action, dtype=np.float32))
        wanted = self.policy.steps_to_decision()
        taken = self.advance(wanted)
        obs, reward, done, _ = self.policy.end_interval()
        info = {"private_steps": taken, "stopped_by_budget": taken < wanted}
        return obs, float(reward or 0.0), bool(done or taken < wanted), False, info
