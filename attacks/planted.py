"""Planted privacy bugs: the audit's self-test (``python benchmarks/audit.py planted``).

Each bug breaks the mechanism *behind the ledger's back*: the ledger records the correct
Poisson-subsampled Gaussian steps (q, sigma) while training does something less private.

* ``noise/2``, ``noise/4``: Gaussian noise of 1/2 or 1/4 of the recorded std.
* ``unclipped``: one parameter group (``per_layer`` grouping) is not clipped; the ledger still
  charges the clipped plan.
* ``shuffle``: fixed-size batches of ``floor(q N)`` records from a shuffle per epoch instead
  of Poisson sampling (every record at most once per epoch).
* ``noise*0.9``: noise of 0.9 of the recorded std, too little for a one-run bound to see.
* ``truncated``: Gaussian noise redrawn beyond 3 std (a truncated normal; the accountant
  assumes the full tails).
* ``replayed``: every step draws step 0's noise (a counter that never advances).
* ``per-tensor``: every parameter tensor draws from the start of its step's stream (a counter
  without the tensor's place): equal noise at equal offsets.

The last four are audited canary-only (``records=0``): the noise check
(:mod:`attacks.noise_check`) reads the coordinates no canary touches.

The audited model is a two-layer MLP (64 -> ``width`` -> 64; width 128: 16.6k parameters, two
groups of 8.3k, so each of ``m <= 8256`` canaries gets its own coordinates; width 256: up to
16.4k canaries) trained on 32 random regression records through the real engine; the
canaries join as injected per-sample gradients (:mod:`attacks.whitebox`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from accountants import calibrate_noise
from attacks.whitebox import GRID_LOW, LedgerFamily, bounds_from_scores, perfect_scores
from attacks.whitebox import whitebox_audit as audit
from dptrain.engine import PrivacyEngine
from dptrain.losses import mse_loss
from dptrain.noise import GaussianNoise
from dptrain.policies import StaticPolicy, StepPlan
from dptrain.secret import RunKey

BUGS = (
    "none", "noise/2", "noise/4", "unclipped", "shuffle",
    "noise*0.9", "truncated", "replayed", "per-tensor",
)  # fmt: skip
NOISE_BUGS = ("noise*0.9", "truncated", "replayed", "per-tensor")  # audited canary-only


class ScaledNoise:
    """Noise of ``factor`` times the requested std (the bug ``noise/2``: factor 1/2)."""

    def __init__(self, noise: GaussianNoise, factor: float) -> None:
        self.noise, self.factor = noise, factor

    def begin_step(self, step: int) -> None:
        self.noise.begin_step(step)

    def __call__(self, like: Tensor, std: float) -> Tensor:
        return self.noise(like, std * self.factor)


class TruncatedNoise:
    """Gaussian noise whose values beyond ``k`` std are redrawn (a truncated normal)."""

    def __init__(self, noise: GaussianNoise, k: float = 3.0) -> None:
        self.noise, self.k = noise, k

    def begin_step(self, step: int) -> None:
        self.noise.begin_step(step)

    def __call__(self, like: Tensor, std: float) -> Tensor:
        z = self.noise(like, 1.0)
        while True:
            out = z.abs() > self.k
            if not out.any():
                return z * std
            z[out] = self.noise(z[out], 1.0)


class ReplayedNoise:
    """The run's noise, but every step positioned at step 0's draws."""

    def __init__(self, noise: GaussianNoise) -> None:
        self.noise = noise

    def begin_step(self, step: int) -> None:
        self.noise.begin_step(0)

    def __call__(self, like: Tensor, std: float) -> Tensor:
        return self.noise(like, std)


class PerTensorNoise:
    """The run's noise, but each tensor's draw starts at its step's first block."""

    def __init__(self, noise: GaussianNoise) -> None:
        self.noise, self.step = noise, 0

    def begin_step(self, step: int) -> None:
        self.step = step

    def __call__(self, like: Tensor, std: float) -> Tensor:
        self.noise.begin_step(self.step)
        return self.noise(like, std)


def planted_noise(bug: str, noise: GaussianNoise) -> Any:
    """The engine's noise for ``bug`` (the honest sampler when the bug is elsewhere)."""
    factor = {"noise/2": 0.5, "noise/4": 0.25, "noise*0.9": 0.9}.get(bug)
    if factor:
        return ScaledNoise(noise, factor)
    if bug == "truncated":
        return TruncatedNoise(noise)
    if bug == "replayed":
        return ReplayedNoise(noise)
    if bug == "per-tensor":
        return PerTensorNoise(noise)
    return noise


class UnclippedGroup(StaticPolicy):
    """Static DP-SGD whose first group is not clipped; the ledger is charged the honest plan."""

    def bind(self, groups, *, sample_rate: float, expected_batch_size: float) -> None:
        super().bind(groups, sample_rate=sample_rate, expected_batch_size=expected_batch_size)
        self.honest = self._plan
        clip = dict(self._plan.clip)
        clip[next(iter(clip))] = math.inf
        self._plan = StepPlan(clip=clip, noise_std=dict(self.honest.noise_std))

    def event(self, plan: StepPlan):
        return super().event(self.honest)


class FixedBatches:
    """Shuffled fixed-size batches: a permutation per epoch cut into batches of
    ``floor(q N)`` (the remainder dropped, as ``drop_last``), so an epoch is ``floor(1 / q)``
    batches and every record is in at most one of them.  (Rounding up would leave one record
    short of a second batch at odd ``N`` and q = 1/2: every batch would come from a fresh
    shuffle, fixed-size sampling without epochs.)"""

    def __init__(self, n: int, q: float, rng: np.random.Generator) -> None:
        self.n, self.size, self.rng = n, max(1, math.floor(q * n + 1e-9)), rng
        self.order: list[int] = []

    def sample(self, step: int) -> Tensor:
        if len(self.order) < self.size:
            self.order = self.rng.permutation(self.n).tolist()
        batch, self.order = self.order[: self.size], self.order[self.size :]
        return torch.tensor(sorted(batch), dtype=torch.long)


def mlp(seed: int, width: int = 128) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 64))


@functools.lru_cache(maxsize=64)
def noise_for(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    """The noise multiplier the claim is calibrated to (shared by the seeds of one cell)."""
    return calibrate_noise(epsilon, delta, q, steps, accountant)


def run_one(
    bug: str,
    *,
    epsilon: float,
    q: float,
    steps: int,
    canaries: int,
    seed: int,
    delta: float = 1e-5,
    confidence: float = 0.95,
    records: int | None = None,
    accountant: str = "rdp",
    width: int = 128,
) -> dict[str, Any]:
    """One white-box audit of a (possibly broken) run; the claim is always the honest plan.
    ``records``: regression records beside the canaries (default 32, and 0 for the noise
    bugs: a canary-only run, where the noise check applies)."""
    if bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}: choose one of {', '.join(BUGS)}")
    if records is None:
        records = 0 if bug in NOISE_BUGS else 32
    sigma = noise_for(epsilon, delta, q, steps, accountant)
    model = mlp(seed, width)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(records, 64, generator=gen), torch.randn(records, 64, generator=gen)
    policy = (UnclippedGroup if bug == "unclipped" else StaticPolicy)(
        clip=1.0, noise_multiplier=sigma
    )
    noise = GaussianNoise(RunKey.from_insecure_seed(seed + 1))  # a benchmark: reproducible
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.05),
        policy=policy,
        sample_rate=q,
        dataset_size=records + canaries,
        loss_fn=mse_loss,
        grouping="per_layer",
        accountant=accountant,
        noise=planted_noise(bug, noise),
    )
    claim = getattr(policy, "honest", None)
    result = audit(
        engine,
        steps,
        canaries=canaries,
        delta=delta,
        confidence=confidence,
        rng=np.random.default_rng([seed, 0x5EC2E7]),
        claim=claim,
        records=(lambda idx: (x[idx], y[idx])) if records else None,
        n_records=records,
        sampler=(lambda n, q_, rng: FixedBatches(n, q_, rng)) if bug == "shuffle" else None,
        coins=RunKey.from_insecure_seed(seed + 2),
        simulations=0,
    )
    return result | {"bug": bug, "seed": seed, "epsilon_target": epsilon, "width": width}


def perfect_reference(
    *,
    epsilon: float,
    q: float,
    steps: int,
    canaries: int,
    delta: float = 1e-5,
    confidence: float = 0.95,
    simulations: int = 32,
    accountant: str = "rdp",
) -> dict[str, float]:
    """Medians of the bounds a perfect attacker on the exact claimed mechanism certifies."""
    from accountants import Event, get_accountant

    sigma = noise_for(epsilon, delta, q, steps, accountant)
    family = LedgerFamily([Event(q, sigma, steps)], get_accountant(accountant), delta)
    rng = np.random.default_rng([int(epsilon * 100), steps, canaries])
    res = bounds_from_scores(
        *perfect_scores(rng, simulations, canaries, steps, q, 1 / sigma),
        family,
        delta,
        confidence,
    )
    out = {k: float(np.median(res[k]["epsilon"])) for k in ("ledger", "fdp", "one_run")}
    out["claim_rejected_share"] = float(np.mean(res["ledger"]["rejects_claim"]))
    out["grid_floor_epsilon"] = family.epsilon(GRID_LOW)
    return out
