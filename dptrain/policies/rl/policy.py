"""The ``rl`` policy: per-group clipping and noise set by an online SAC agent (RLDP).

See :mod:`dptrain.policies.rl` for the decision process and the privacy contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from accountants import Ledger
from accountants.calibrate import EpsilonUnreachableError
from accountants.rdp import RdpAccountant

from ...errors import RecipeError
from ...losses import perplexity
from ..base import FrozenMap, NoiseFn, Policy, RunContext, StepContext, StepPlan, StepSums
from ..registry import check_accountant
from . import warm
from .control import (
    Pacer,
    Released,
    Setting,
    action_dim,
    bands_of,
    count_cost,
    count_steps,
    decode,
    effective_sigma,
    grid_index,
    grid_sigma,
    observation,
    reward,
)
from .options import RLConfig
from .state import DecisionState


@dataclass(frozen=True)
class RLPlan(StepPlan):
    """A step plan that may also release each band's centred unclipped count with noise of std
    ``count_std``; ``noise_multiplier`` is then the composed mechanism's."""

    count_std: float | None = None
    count_bands: int = 0

    @property
    def noise_multiplier(self) -> float:
        return effective_sigma(
            super().noise_multiplier, count_cost(self.count_bands, self.count_std)
        )


class RLPolicy(Policy):
    """Clip thresholds per group and the noise multiplier, chosen every ``rl.every`` steps by
    a SAC agent trained online from released and public quantities only."""

    name = "rl"
    adaptive = True
    needs_public_data = True
    # sigma_ref, the clip the agent scales, its (immutable) settings and what bind derives
    frozen_settings = Policy.frozen_settings | {"clip", "cfg", "count_std", "bands", "band_of"}

    def __init__(
        self,
        clip: float = 1.0,
        noise_multiplier: float | None = None,
        rl: RLConfig | dict[str, Any] | None = None,
    ) -> None:
        if not (clip > 0 and math.isfinite(clip)):
            raise RecipeError(
                f"policy.clip: policy rl needs a finite clip > 0 (its agent scales it), got "
                f"{clip}. Fix: give a finite clip; a non-private baseline (clip .inf) is "
                "policy: static with noise_multiplier: 0"
            )
        if noise_multiplier is not None and not (
            noise_multiplier > 0 and math.isfinite(noise_multiplier)
        ):
            raise RecipeError(
                f"policy.noise_multiplier: policy rl scales its noise around sigma_ref = "
                f"noise_multiplier, which must be finite and > 0, got {noise_multiplier}. Fix: "
                "omit it to calibrate it from privacy.epsilon; a non-private baseline "
                "(noise_multiplier 0) is policy: static"
            )
        self.cfg = rl if isinstance(rl, RLConfig) else RLConfig.model_validate(rl or {})
        if self.cfg.init_from is not None:
            warm.check_source(self.cfg.init_from)
        self.clip = float(clip)
        self.noise_multiplier = noise_multiplier  # sigma_ref; calibrated if None
        self.driver = "agent"  # or "env": a PrivateTrainingEnv makes the decisions
        self._run: RunContext | None = None
        self._agent: Any = None
        self._ledger: Ledger | None = None
        self._budget: tuple[float, float] | None = None  # (epsilon, delta)
        self._state = DecisionState()  # checkpointed (see .state)
        self._dims: dict[str, int] | None = None
        # keeps the ledger's adaptive RDP curve incrementally: the pacer's and the spend's
        # queries cost the same at any run length (results bitwise those of summing the events)
        self._rdp = RdpAccountant()

    @property
    def _setting(self) -> Setting | None:
        """The current interval's decoded setting (read by the tests)."""
        return self._state.setting

    @property
    def _last(self) -> dict[str, Any] | None:
        """The observation, public loss and spend at the last decision (read by the tests)."""
        return self._state.last

    # -- set-up --------------------------------------------------------------------------

    def calibrate(
        self,
        target_epsilon: float,
        delta: float,
        *,
        sample_rate: float,
        steps: int,
        accountant: str,
    ) -> float:
        """``sigma_ref``: the constant noise multiplier whose ``steps`` steps spend exactly the
        budget under the adaptive RDP filter (count releases not included)."""
        check_accountant(self, accountant)
        pacer = Pacer(sample_rate, target_epsilon, delta, 0.0)
        self.noise_multiplier = pacer.sigma([], steps, 0)
        return self.noise_multiplier

    def bind(self, groups, *, sample_rate: float, expected_batch_size: float) -> None:
        super().bind(groups, sample_rate=sample_rate, expected_batch_size=expected_batch_size)
        if self.noise_multiplier is None:
            raise ValueError(
                "set noise_multiplier (sigma_ref), or call calibrate() with a target epsilon, "
                "before binding"
            )
        # immutable (tuples, a FrozenMap): the plans, count releases and reports read them
        self.bands = tuple(tuple(band) for band in bands_of(self.groups, self.cfg.bands))
        self.band_of = FrozenMap((g, b) for b, band in enumerate(self.bands) for g in band)
        frac = self.cfg.clip_fraction_noise
        self.count_std = None if frac is None else frac * expected_batch_size
        self._state.released = Released.empty(len(self.bands))

    def attach(self, run: RunContext) -> None:
        if not run.public_batches:
            raise ValueError(
                "policy rl needs public batches for its reward (RunContext.public_batches); "
                "in a recipe set data.public_fraction or data.public_path"
            )
        self._run = run
        if self.cfg.init_from is not None and self._state.warm is None:
            self._state.warm = warm.source_info(self.cfg.init_from)

    @property
    def planned_steps(self) -> int:
        if self._run is None:
            raise RuntimeError("RLPolicy.attach(RunContext(...)) must be called before training")
        return self._run.planned_steps

    @property
    def agent(self) -> Any:
        """The SAC agent, built on first use (and warm-started from ``rl.init_from``)."""
        if self._agent is None:
            self._agent = self._make_agent(warm_start=True)
        return self._agent

    def _make_agent(self, *, warm_start: bool) -> Any:
        from .agent import SacAgent
        from .env import PrivateTrainingEnv

        seed = self.cfg.seed if self.cfg.seed is not None else self._run.seed if self._run else 0
        agent = SacAgent(PrivateTrainingEnv(self), self.cfg, seed)
        if warm_start and self.cfg.init_from is not None:
            warm.load_agent(agent, self.cfg.init_from)
        return agent

    # -- planning ------------------------------------------------------------------------

    def plan(self, context: StepContext) -> StepPlan:
        if context.budget_epsilon is None or context.delta is None or context.ledger is None:
            raise ValueError(
                "policy rl paces its noise against the privacy budget: give the PrivacyEngine "
                "a budget=Budget(epsilon, delta)"
            )
        self._ledger, self._budget = context.ledger, (context.budget_epsilon, context.delta)
        self._state.step = context.step
        if self._state.action is None:  # the first decision of a fresh run
            if self.driver == "agent":
                self._decide()
            else:
                self.apply(np.zeros(action_dim(len(self.bands)), dtype=np.float32))
        if self._state.setting is None:
            self._state.setting = self._materialize()
        s, k, T = context.step + 1, self.cfg.every, self.planned_steps
        counted = self.count_std is not None and (s % k == 0 or s == T)
        st = self._state.setting
        return RLPlan(
            clip=dict(st.clip),
            noise_std=dict.fromkeys(self.groups, st.sigma * st.clip_total),
            count_std=self.count_std if counted else None,
            count_bands=len(self.bands) if counted else 0,
        )

    def apply(self, action: np.ndarray) -> None:
        """Take ``action`` (in [-1, 1]^A) for the coming interval."""
        self._state.action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        self._state.setting = self._materialize() if self._budget is not None else None

    def _pacer(self) -> Pacer:
        eps, delta = self._budget
        extra = count_cost(len(self.bands), self.count_std)
        return Pacer(self.sample_rate, eps, delta, extra, accountant=self._rdp)

    def _counted(self, after: int, through: int) -> int:
        return 0 if self.count_std is None else count_steps(after, through, self.cfg.every)

    def _pace(self) -> float:
        """Constant sigma that spends the rest of the budget over the remaining steps."""
        t, T = self._state.step, self.planned_steps
        if T <= t:
            return self.noise_multiplier
        try:
            return self._pacer().sigma(
                self._ledger, T - t, self._counted(t, T), hint=self.noise_multiplier
            )
        except EpsilonUnreachableError:  # the budget is spent: the filter will refuse the next step
            return self.noise_multiplier * self.cfg.noise_range

    def _floor(self, pace: float) -> float:
        """Least sigma for the coming interval that leaves the steps after it at noise no
        more than ``noise_range`` times the current pace (the whole interval, if it is the last)."""
        t, T = self._state.step, self.planned_steps
        end = min(t + self.cfg.every, T)
        if end >= T:
            return pace
        tail = (T - end, self._counted(end, T), grid_sigma(grid_index(pace * self.cfg.noise_range)))
        try:
            return self._pacer().sigma(
                self._ledger, end - t, self._counted(t, end), hint=pace, tail=tail
            )
        except EpsilonUnreachableError:  # no sigma keeps the tail in budget
            return pace

    def _materialize(self) -> Setting:
        if not self.cfg.pacing:
            return decode(
                self._state.action,
                base_sigma=self.noise_multiplier,
                clip=self.clip,
                bands=self.bands,
                cfg=self.cfg,
            )
        pace = self._pace()
        st = decode(
            self._state.action, base_sigma=pace, clip=self.clip, bands=self.bands, cfg=self.cfg
        )
        if st.sigma < pace:
            st = Setting(max(st.sigma, self._floor(pace)), st.clip_total, st.clip)
        return st

    # -- the private release -------------------------------------------------------------

    def private_counts(self, plan: StepPlan, within_clip: dict[str, Tensor]) -> Tensor | None:
        """On count steps, band ``b``'s centred count over the samples given, ``sum_i
        (1[sample i within C_g for all g in b] - 1/2)``; None on other steps.  Additive over
        disjoint parts of the batch, so the engine's sum over ranks is the global batch's."""
        if not isinstance(plan, RLPlan) or plan.count_std is None:
            return None
        # on the CPU (the engine's contract: it moves the counts for the all-reduce and back,
        # and the release noises them there); the flags stay on their device, and their
        # sums come to the host in one transfer (exact: integers below 2^53 in float64)
        centred = torch.zeros(len(self.bands), dtype=torch.float64, device="cpu")
        counted, sums, half = [], [], []
        for b, band in enumerate(self.bands):
            flags = [within_clip[g] for g in band if g in within_clip]
            if flags:
                dev = flags[0].device
                inside = torch.stack([f.to(dev) for f in flags]).all(0)
                counted.append(b)
                sums.append(inside.sum())
                half.append(inside.numel() / 2)
        if counted:
            dev = sums[0].device
            total = torch.stack([t.to(dev) for t in sums]).to(device="cpu", dtype=torch.float64)
            where = torch.tensor(counted, dtype=torch.long, device="cpu")
            centred[where] = total - torch.tensor(half, dtype=torch.float64, device="cpu")
        return centred

    @property
    def max_noised_counts(self) -> int:
        """One noisy count per band on a count step (none without ``clip_fraction_noise``)."""
        return 0 if self.count_std is None else len(self.bands)

    def release(self, sums: StepSums, plan: StepPlan, noise: NoiseFn) -> dict[nn.Parameter, Tensor]:
        """The DP-SGD release and, on count steps, the noisy fraction of samples within clip
        per band: ``(centred + N(0, count_std^2)) / E[B] + 1/2``.  ``centred`` is
        ``sums.counts`` (the engine's sum of :meth:`private_counts` over ranks: under
        ``--nproc``, the whole global batch, not rank 0's shard), or computed here from
        ``sums.within_clip`` when a caller gives no counts.  The noise is drawn once, here (the
        engine runs the release on rank 0 alone).  Privacy contract unchanged by the ranks:
        adding or removing one sample, held by exactly one rank, moves each band's summed
        centred count by 1/2, the sensitivity :func:`.control.count_cost` charges."""
        centred = None  # validated before any noise is drawn: a refusal draws nothing
        if isinstance(plan, RLPlan) and plan.count_std is not None:
            centred = sums.counts
            if centred is None:
                centred = self.private_counts(plan, sums.within_clip)
            if tuple(centred.shape) != (len(self.bands),):
                raise ValueError(
                    f"StepSums.counts has shape {tuple(centred.shape)}, policy rl has "
                    f"{len(self.bands)} bands: pass the sum of its private_counts(plan, "
                    "within_clip) over the batch's parts, or leave counts None"
                )
            centred = centred.to(device="cpu", dtype=torch.float64)
        out = super().release(sums, plan, noise)
        fraction = None
        if centred is not None:
            noisy = centred + noise(centred, plan.count_std).to(torch.float64)
            fraction = (noisy / sums.expected_batch_size + 0.5).numpy()
        self._record(out, plan, sums, fraction)  # released values only from here on
        return out

    def _record(self, out, plan: StepPlan, sums: StepSums, fraction: np.ndarray | None) -> None:
        if self._dims is None:
            self._dims = {g: 0 for g in self.groups}
            for p, t in out.items():
                self._dims[sums.group_of[p]] += t.numel()
        n = len(self.bands)
        energy, expected = np.zeros(n), np.zeros(n)
        with torch.no_grad():  # every parameter's sum of squares in one host transfer
            squares = [u.double().pow(2).sum() for u in out.values()]
            if squares:
                dev = squares[0].device
                read = torch.stack([s.to(dev) for s in squares]).tolist()
                for p, v in zip(out, read, strict=True):
                    energy[self.band_of[sums.group_of[p]]] += v
        for g, d in self._dims.items():
            expected[self.band_of[g]] += d * (plan.noise_std[g] / sums.expected_batch_size) ** 2
        rel = self._state.released
        rel.energy_ratio = rel.energy_ratio + energy / np.maximum(expected, 1e-30)
        rel.steps += 1
        rel.spend += (self.noise_multiplier / plan.noise_multiplier) ** 2 / self.planned_steps
        if fraction is not None:
            rel.fraction = fraction

    # -- decisions -----------------------------------------------------------------------

    def observe(self, report: dict[str, Any]) -> dict[str, float] | None:
        self._state.step = report["step"]
        if self.driver != "agent":
            return None
        if self._state.step % self.cfg.every == 0 or self._state.step == self.planned_steps:
            return self._decide()
        return None

    def steps_to_decision(self) -> int:
        k = self.cfg.every
        return max(0, min(k - self._state.step % k, self.planned_steps - self._state.step))

    def _decide(self) -> dict[str, float]:
        prev, prev_action = self._state.last, self._state.action
        obs, r, done, metrics = self.end_interval()
        agent = self.agent
        if prev is not None:
            agent.add(prev["obs"], prev_action, r, obs, done)
            agent.update()
            metrics["rl_ent_coef"] = agent.ent_coef()
        if not done:
            self.apply(agent.act(obs))
            metrics["rl_next_sigma"] = self._state.setting.sigma
            metrics["rl_next_clip"] = self._state.setting.clip_total
        return metrics

    def _spent(self) -> float:
        if self._ledger is None or not self._ledger.events:
            return 0.0
        return self._rdp.ledger_epsilon(self._ledger, self._budget[1], adaptive=True)

    def _public_loss(self) -> float:
        with torch.no_grad():
            return math.log(perplexity(self._run.model, self._run.public_batches))

    def observation(self) -> np.ndarray:
        """The current state (computed now if no decision was made yet)."""
        if self._state.last is None:
            self.end_interval()
        return self._state.last["obs"].copy()

    def end_interval(self) -> tuple[np.ndarray, float | None, bool, dict[str, float]]:
        """Close the interval: the new state, the reward of the last action, whether the run
        is over, and metrics to log.  Reads only public data and released quantities."""
        loss, spent = self._public_loss(), self._spent()
        if self._state.loss0 is None:
            self._state.loss0 = loss
        budget = self._budget[0] if self._budget else math.inf
        st = self._state.setting or Setting(self.noise_multiplier, self.clip, {})
        prev = self._state.last
        prev_action = (
            self._state.action
            if self._state.action is not None
            else np.zeros(action_dim(len(self.bands)))
        )
        obs = observation(
            step=self._state.step,
            planned=self.planned_steps,
            spent=spent,
            budget=budget,
            loss=loss,
            loss0=self._state.loss0,
            prev_loss=None if prev is None else prev["loss"],
            sigma=st.sigma,
            sigma_ref=self.noise_multiplier,
            clip_total=st.clip_total,
            clip=self.clip,
            released=self._state.released,
            prev_action=prev_action,
        )
        r = None
        if prev is not None:
            r = reward(
                prev_loss=prev["loss"],
                loss=loss,
                loss0=self._state.loss0,
                spend=self._state.released.spend,
                cfg=self.cfg,
            )
        self._state.last = {"obs": obs, "loss": loss, "spent": spent}
        self._state.released = Released.empty(len(self.bands))
        metrics = {"rl_public_loss": loss} | ({} if r is None else {"rl_reward": r})
        return obs.copy(), r, self._state.step >= self.planned_steps, metrics

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {"sigma_ref": self.noise_multiplier, **self._state.state_dict(), "agent": None}
        if self.driver == "agent" and self._run is not None:
            state["agent"] = self.agent.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sigma_ref = state["sigma_ref"]
        if self.noise_multiplier is None:
            self.noise_multiplier = sigma_ref
        elif sigma_ref != self.noise_multiplier:  # the run plan resolved sigma_ref: keep it
            from ...rundir import CheckpointError

            raise CheckpointError(
                f"the checkpoint's rl policy paced around sigma_ref={sigma_ref!r}, but this run "
                f"resolved sigma_ref={self.noise_multiplier!r}. Fix: resume with the recipe and "
                "data that started the run."
            )
        released = self._state.released
        self._state = DecisionState.from_state_dict(state)
        if self._state.released is None:  # saved before bind(): keep the bound one
            self._state.released = released
        if state["agent"] is not None and self.driver == "agent":
            if self._agent is None:
                self._agent = self._make_agent(warm_start=False)
            self._agent.load_state_dict(state["agent"])

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "clip": self.clip,
            "noise_multiplier_ref": self.noise_multiplier,
            "bands": [len(b) for b in getattr(self, "bands", [])],
            "rl": self.cfg.model_dump(),
        }
        if self._state.warm is not None:
            out["warm_start"] = {k: v for k, v in self._state.warm.items() if k != "ledger"}
            delta = self._budget[1] if self._budget is not None else None
            out["notes"] = [warm.warm_note(self._state.warm, self._ledger, delta)]
        return out

    @property
    def warm_start(self) -> dict[str, Any] | None:
        """The warm-start run's certified guarantee (run, epsilon, delta), or None."""
        if self._state.warm is None:
            return None
        return {k: self._state.warm[k] for k in ("run", "epsilon", "delta")}
