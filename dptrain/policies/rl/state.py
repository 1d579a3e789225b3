"""The rl policy's decision state between steps, and its checkpoint form.

Everything here is public or released: the step, the agent's last action and its decoded
setting, the last observation (public loss, spend so far), the released statistics of the
current interval and the warm-start source.  Arrays are stored as tensors, so a checkpoint
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .control import Released, Setting


@dataclass
class DecisionState:
    """What the next decision depends on (see the module docstring)."""

    step: int = 0
    action: np.ndarray | None = None  # in [-1, 1]^A, for the current interval
    setting: Setting | None = None  # the action decoded against the budget
    last: dict[str, Any] | None = None  # obs, loss, spent at the last decision
    loss0: float | None = None  # public loss at the first decision
    released: Released | None = None  # the current interval's released statistics
    warm: dict[str, Any] | None = None  # the warm-start run (run, epsilon, delta, ledger)

    def state_dict(self) -> dict[str, Any]:
        st, last, rel = self.setting, self.last, self.released
        return {
            "step": self.step,
            "action": _tensor(self.action),
            "setting": None
            if st is None
            else {"sigma": st.sigma, "clip_total": st.clip_total, "clip": dict(st.clip)},
            "last": None
            if last is None
            else {"obs": _tensor(last["obs"]), "loss": last["loss"], "spent": last["spent"]},
            "loss0": self.loss0,
            "released": None
            if rel is None
            else {
                "energy_ratio": _tensor(rel.energy_ratio),
                "steps": rel.steps,
                "spend": rel.spend,
                "fraction": _tensor(rel.fraction),
            },
            "warm": self.warm,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DecisionState:
        s, last, rel = state["setting"], state["last"], state["released"]
        return cls(
            step=state["step"],
            action=_array(state["action"]),
            setting=None if s is None else Setting(s["sigma"], s["clip_total"], dict(s["clip"])),
            last=None
            if last is None
            else {"obs": _array(last["obs"]), "loss": last["loss"], "spent": last["spent"]},
            loss0=state["loss0"],
            released=None
            if rel is None
            else Released(
                _array(rel["energy_ratio"]), rel["steps"], _array(rel["fraction"]), rel["spend"]
            ),
            warm=state["warm"],
        )


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a.copy())


def _array(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.numpy().copy()
