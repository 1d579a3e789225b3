"""Recipe options of the ``rl`` policy (``policy: {name: rl, rl: {...}}``); no heavy imports."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RLConfig(BaseModel):
    """The agent's schedule, action bounds, reward and SAC settings (see :mod:`dptrain.policies.rl`).

    Immutable: a policy reads it at every step and in its report, and derives its count noise
    from it at bind, so a field changed later would make them disagree."""

    model_config = ConfigDict(extra="forbid")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"RLConfig is immutable: rl.{name} cannot be set on a built config (an rl policy "
            f"plans, counts and reports from it). Fix: give {name} when the config is built "
            f"(RLConfig({name}=...), or the recipe's policy.rl.{name}), or build a copy with "
            f"cfg.model_copy(update={{{name!r}: ...}}) before building the policy"
        )

    every: int = Field(5, ge=1, description="private steps per agent decision (k)")
    # action bounds
    noise_range: float = Field(
        1.2, ge=1, description="sigma = paced sigma * noise_range**a (a in [-1, 1])"
    )
    clip_range: float = Field(4.0, ge=1, description="total clip = policy.clip * clip_range**a")
    allocation_range: float = Field(
        2.0, ge=1, description="a band's share of the clip norm scales by allocation_range**a"
    )
    bands: int = Field(
        4, ge=1, description="clip allocation bands: contiguous runs of groups sharing one action"
    )
    sigma_min: float | None = Field(None, gt=0, description="hard lower bound on sigma")
    sigma_max: float | None = Field(None, gt=0, description="hard upper bound on sigma")
    pacing: bool = Field(
        True, description="centre sigma on the constant noise that spends the rest of the budget"
    )
    clip_fraction_noise: float | None = Field(
        0.2,
        gt=0,
        description="std of the released fraction of unclipped samples per band (one release per "
        "decision, charged to the ledger); null: not released",
    )
    # reward
    privacy_penalty: float = Field(1.0, ge=0, description="lambda: reward lost per budget spent")
    reward_scale: float = Field(100.0, gt=0)
    # SAC
    gamma: float = Field(0.9, ge=0, le=1)
    learning_rate: float = Field(3e-4, gt=0)
    # a tuple: the config is immutable, its containers included (a recipe's list validates)
    net_arch: tuple[int, ...] = Field((32, 32), min_length=1)
    batch_size: int = Field(32, ge=1)
    gradient_steps: int = Field(8, ge=0, description="SAC updates per update round")
    learn_every: int = Field(
        1,
        ge=1,
        description="decisions per SAC update round: the agent runs gradient_steps updates after "
        "every learn_every-th transition (1: every decision; the agent's largest cost)",
    )
    learning_starts: int = Field(4, ge=0, description="transitions before the agent trains")
    buffer_size: int = Field(4096, ge=1)
    tau: float = Field(0.02, gt=0, le=1)
    ent_coef: float | None = Field(
        None, gt=0, description="fixed entropy coefficient; null: tuned (SAC auto, from 0.05)"
    )
    explore_std: float = Field(
        0.1, gt=0, le=1, description="initial exploration std of the untrained actor"
    )
    deterministic: bool = Field(False, description="act with the actor's mean (no exploration)")
    seed: int | None = Field(None, description="agent seed; default: the recipe's seed")
    init_from: str | None = Field(None, description="RUN_DIR whose agent to start from")

    @model_validator(mode="after")
    def _bounds(self) -> RLConfig:
        if self.sigma_min is not None and self.sigma_max is not None:
            if self.sigma_min > self.sigma_max:
                raise ValueError("rl.sigma_min must not exceed rl.sigma_max")
        return self


class RLOptions(BaseModel):
    """What ``policy:`` accepts for ``name: rl`` beyond name, grouping, clip, noise_multiplier."""

    model_config = ConfigDict(extra="forbid")

    rl: RLConfig = Field(default_factory=RLConfig)
