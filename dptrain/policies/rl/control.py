"""The decision process the agent controls: action decoding, noise pacing, observation, reward.

Pure functions and small records (no stable-baselines3); the math is stated in
:mod:`dptrain.policies.rl`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from accountants import Event, Ledger
from accountants.calibrate import EpsilonUnreachableError
from accountants.rdp import (
    ADAPTIVE_ORDERS,
    RdpAccountant,
    adaptive_epsilon_from_rdp,
    conversion_floor,
)

from .options import RLConfig

OBS_BOUND = 10.0  # observations are clipped to [-OBS_BOUND, OBS_BOUND]
_BASE_FEATURES = 7  # t/T, eps/eps_B, pace gap, L/L0, dL, log sigma/sigma_ref, log C/clip


def bands_of(groups: Sequence[str], bands: int) -> list[list[str]]:
    """Split ``groups`` (model order) into ``min(bands, len(groups))`` contiguous runs."""
    n = min(bands, len(groups))
    out: list[list[str]] = [[] for _ in range(n)]
    for i, g in enumerate(groups):
        out[i * n // len(groups)].append(g)
    return out


def action_dim(n_bands: int) -> int:
    return 2 + n_bands


def obs_dim(n_bands: int) -> int:
    return _BASE_FEATURES + 2 * n_bands + action_dim(n_bands)


def count_cost(n_bands: int, count_std: float | None) -> float:
    """What one release of the centred unclipped counts adds to ``1 / sigma_eff^2``: each band's
    count moves by 1/2 when a sample is added or removed, and gets noise of std ``count_std``."""
    return 0.0 if count_std is None else n_bands * (0.5 / count_std) ** 2


def effective_sigma(sigma: float, extra_cost: float) -> float:
    """``sigma_eff = (1 / sigma^2 + extra_cost)^(-1/2)``: the gradient release (noise multiplier
    ``sigma``) and the count release composed into one Gaussian mechanism."""
    inv = (0.0 if math.isinf(sigma) else 1.0 / sigma**2) + extra_cost
    return math.inf if inv == 0 else 1.0 / math.sqrt(inv)


def count_steps(after: int, through: int, every: int) -> int:
    """How many steps ``s`` in ``(after, through]`` release the counts: ``s % every == 0`` or
    ``s == through`` (the last step of each decision interval)."""
    if through <= after:
        return 0
    n = through // every - after // every
    return n + (1 if through % every else 0)


SIGMA_GRID = 1.01
"""Noise multipliers are rounded up to powers of 1.01: the agent's noise resolution is 1%, and
the accountants' per-sigma RDP (costly to compute) is shared across steps and decisions."""
_J_MIN, _J_MAX = -700, 1400  # sigma in [1e-3, 1e6]


def grid_sigma(j: int) -> float:
    return SIGMA_GRID**j


def grid_index(sigma: float) -> int:
    """The smallest ``j`` with ``grid_sigma(j) >= sigma`` (more noise, never less)."""
    j = math.ceil(math.log(sigma) / math.log(SIGMA_GRID) - 1e-9)
    return j if grid_sigma(j) >= sigma else j + 1


_SHARED_RDP = RdpAccountant()
"""The pacer's default accountant: it keeps each ledger's RDP curve incrementally
(:meth:`~accountants.rdp.RdpAccountant.ledger_rdp`), so a query costs the same at step 10^4 as
at step 10."""


@dataclass(frozen=True)
class Pacer:
    """The constant noise that spends exactly the rest of a budget over the remaining steps,
    measured by the adaptive RDP filter's conversion (the one that guards the run)."""

    sample_rate: float
    epsilon: float
    delta: float
    extra_cost: float  # count release cost, on count steps only
    accountant: RdpAccountant = field(default=_SHARED_RDP, repr=False, compare=False)

    def _curve(self, sigma: float, steps: int, counted: int) -> np.ndarray:
        rdp, q = self.accountant, self.sample_rate
        curve = (steps - counted) * rdp.step_rdp(Event(q, sigma), adaptive=True)
        if counted:
            s_eff = effective_sigma(sigma, self.extra_cost)
            curve = curve + counted * rdp.step_rdp(Event(q, s_eff), adaptive=True)
        return curve

    def _spent_curve(self, events: Sequence[Event] | Ledger) -> np.ndarray:
        """The adaptive RDP curve of what is already charged: by the accountant's incremental
        per-ledger curve for a :class:`~accountants.Ledger` (bitwise equal to summing its
        events, see :meth:`~accountants.rdp.RdpAccountant.ledger_rdp`), else by summing."""
        if isinstance(events, Ledger):
            return self.accountant.ledger_rdp(events, adaptive=True)
        return self.accountant.rdp(events, adaptive=True)

    def sigma(
        self,
        events: Sequence[Event] | Ledger,
        steps: int,
        counted: int,
        hint: float = 1.0,
        tail: tuple[int, int, float] | None = None,
    ) -> float:
        """Smallest grid sigma with ``events`` (a list, or a ledger), then ``steps`` steps at
        sigma (``counted`` of them releasing the counts), then ``tail = (steps, counted,
        sigma)`` within (epsilon, delta); :class:`EpsilonUnreachableError` if none up to 1e6
        (the budget is spent, or below the conversion's floor: the message says which)."""
        base = self._spent_curve(events)
        if tail is not None and tail[0] > 0:
            base = base + self._curve(tail[2], tail[0], tail[1])

        def fits(j: int) -> bool:
            curve = base + self._curve(grid_sigma(j), steps, counted)
            return adaptive_epsilon_from_rdp(ADAPTIVE_ORDERS, curve, self.delta) <= self.epsilon

        j, step = min(max(grid_index(hint), _J_MIN), _J_MAX), 1
        if fits(j):  # gallop down to a misfit, then bisect
            hi, lo = j, j - 1
            while fits(lo):
                hi, lo, step = lo, lo - step, step * 2
                if lo < _J_MIN:
                    return grid_sigma(hi)
        else:
            lo, hi = j, j + 1
            while not fits(hi):
                lo, hi, step = hi, hi + step, step * 2
                if hi > _J_MAX:
                    raise EpsilonUnreachableError(self._unreachable(base))
        while hi - lo > 1:
            mid = (lo + hi) // 2
            hi, lo = (mid, lo) if fits(mid) else (hi, mid)
        return grid_sigma(hi)

    def _unreachable(self, base: np.ndarray) -> str:
        """Why no grid sigma fits: the steps already charged (and the tail) spend the budget
        alone, or the budget is below the adaptive conversion's floor at delta / |orders|."""
        head = (
            f"no noise multiplier up to {grid_sigma(_J_MAX):.3g} keeps epsilon <= {self.epsilon:g}"
        )
        floor, order = conversion_floor(ADAPTIVE_ORDERS, self.delta / len(ADAPTIVE_ORDERS))
        spent = adaptive_epsilon_from_rdp(ADAPTIVE_ORDERS, base, self.delta)
        if self.epsilon >= floor and spent > self.epsilon:
            return (
                f"{head}: the steps already charged (and any planned tail) spend epsilon "
                f"{spent:.4g} by themselves"
            )
        return (
            f"{head}: the adaptive RDP conversion certifies no epsilon below {floor:.4g} at "
            f"delta={self.delta:g} (a limit of its order list, set by order {order:g}), and "
            + ("the budget is below it" if self.epsilon < floor else "the budget is just above it")
            + "; raise the budget's epsilon or delta"
        )


@dataclass(frozen=True)
class Setting:
    """A decoded action: noise multiplier of the gradient release and clip per group."""

    sigma: float
    clip_total: float
    clip: dict[str, float]


def decode(
    action: np.ndarray,
    *,
    base_sigma: float,
    clip: float,
    bands: list[list[str]],
    cfg: RLConfig,
) -> Setting:
    """``sigma = base * noise_range^a0`` (clamped to [sigma_min, sigma_max], rounded up to the
    grid);
    ``C = clip * clip_range^a1``; band ``b`` weighs ``allocation_range^a_{2+b}`` and
    ``C_g = C w_g / sqrt(sum_h w_h^2)`` so that ``sqrt(sum_g C_g^2) = C``."""
    a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
    sigma = base_sigma * cfg.noise_range ** float(a[0])
    if cfg.sigma_min is not None:
        sigma = max(sigma, cfg.sigma_min)
    if cfg.sigma_max is not None:
        sigma = min(sigma, cfg.sigma_max)
    sigma = grid_sigma(grid_index(sigma))
    total = clip * cfg.clip_range ** float(a[1])
    weight = {
        g: cfg.allocation_range ** float(a[2 + b]) for b, band in enumerate(bands) for g in band
    }
    norm = math.sqrt(sum(w**2 for w in weight.values()))
    return Setting(sigma, total, {g: total * w / norm for g, w in weight.items()})


@dataclass
class Released:
    """Per-band statistics of one interval's released outputs (post-processing only)."""

    energy_ratio: np.ndarray  # sum over steps of ||u_b||^2 / E||noise_b||^2
    steps: int
    fraction: np.ndarray | None  # last released noisy fraction of unclipped samples per band
    spend: float = 0.0  # sum over steps of (sigma_ref / sigma_eff)^2 / T

    @classmethod
    def empty(cls, n_bands: int) -> Released:
        return cls(np.zeros(n_bands), 0, None)


def observation(
    *,
    step: int,
    planned: int,
    spent: float,
    budget: float,
    loss: float,
    loss0: float,
    prev_loss: float | None,
    sigma: float,
    sigma_ref: float,
    clip_total: float,
    clip: float,
    released: Released,
    prev_action: np.ndarray,
) -> np.ndarray:
    """The state vector (see :mod:`dptrain.policies.rl` for each entry)."""
    n = len(released.energy_ratio)
    frac = released.fraction if released.fraction is not None else np.full(n, 0.5)
    snr = (
        np.log(np.maximum(released.energy_ratio / released.steps, 1e-3))
        if released.steps
        else np.zeros(n)
    )
    dl = 0.0 if prev_loss is None else 10.0 * (prev_loss - loss) / loss0
    feats = [
        step / planned,
        spent / budget,
        spent / budget - step / planned,
        loss / loss0,
        dl,
        math.log(sigma / sigma_ref),
        math.log(clip_total / clip),
    ]
    obs = np.concatenate([feats, snr, np.clip(frac, -0.5, 1.5), prev_action]).astype(np.float32)
    return np.clip(np.nan_to_num(obs, nan=0.0), -OBS_BOUND, OBS_BOUND)


def reward(*, prev_loss: float, loss: float, loss0: float, spend: float, cfg: RLConfig) -> float:
    """``scale * ((L_prev - L) / L0 - lambda * spend)``, ``spend`` the interval's share of the
    reference schedule's privacy cost (:attr:`Released.spend`)."""
    return float(cfg.reward_scale * ((prev_loss - loss) / loss0 - cfg.privacy_penalty * spend))
