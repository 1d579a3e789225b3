"""White-box canary audit through the real :class:`~dptrain.engine.PrivacyEngine`.

Threat model: the auditor sees every released update (what the optimizer receives, through
:meth:`PrivacyEngine.add_release_hook`), knows everything but the secret coins, and plants
``m`` canaries: records whose per-sample gradient is fixed and chosen by the auditor.  This is
the adversary the accountant covers, so a lower bound above the claimed epsilon means the
implementation is not the mechanism its ledger describes.

**Canaries.**  Canary ``i`` has, in every parameter group ``g``, a random unit direction
``v_ig`` and its gradient there is
``scale * C_g * v_ig``: norm above ``C_g`` in every group, so a correct engine clips it to
``c_i = (C_g v_ig)_g``, of total norm ``C = sqrt(sum_g C_g^2)`` (the sensitivity).  Each canary
is a member with probability 1/2 (secret coin); members are records of the dataset, sampled
by the same (Poisson, rate q) sampler as any record, and reach the engine through
``step(batch, injected=...)``, so clipping, grouping, noise and the release are production
code.  An engine that leaves a group unclipped passes ``scale`` (default 100) times more of
it, enough to stand out of the background of unclipped records there.  Where a
group has at least ``m`` coordinates, each canary gets its own (up to ``support``), so the
canaries are exactly orthogonal and never blur each other's scores; in smaller groups their
random supports overlap.

**Score.**  With the claimed plan (clip ``C_g`` and noise std ``s_g`` per group, effective noise
``sigma = 1 / sqrt(sum_g (C_g / s_g)^2)``) the whitened projection of a released sum ``D_t``

    z_it = sigma * sum_g (C_g / s_g^2) <D_t|g, v_ig>

is ``N(mu I_it, 1)`` with ``mu = 1 / sigma`` and ``I_it`` the canary's inclusion in step ``t``
(other canaries and records add only near-orthogonal background).  Per step the
likelihood ratio of "member" is ``1 - q + q exp(mu z - mu^2 / 2)``; the score is its log summed
over steps, the Neyman-Pearson statistic of the exact subsampled Gaussian mechanism.

**Bounds** (:mod:`attacks.bounds`): guess "member" for the top scores and "non-member" for the
bottom ones (fixed plans, Bonferroni), then

* ``ledger``: the f-DP one-run test against the trade-off curves of the run's own ledger with
  every noise multiplier scaled by ``2^(j/16)``; the least private rejected curve has noise
  ``sigma_lo`` and the run's accountant charges it ``epsilon``.  The verdict "likely privacy
  bug" is the rejection of the claimed curve itself (``sigma_lo >= sigma``, equivalently that
  epsilon above the claim), at the stated confidence: valid with no assumption on the curve.
* ``fdp``: the same test against Gaussian curves (mu-GDP, as epsilon at delta), the figure the
  literature reports; it assumes the run's curve is Gaussian.
* ``one_run``: Steinke, Nasr, Jagielski's (eps, delta) bound.

``sampling`` (:mod:`attacks.sampling`): is the sampler Poisson?  Within an epoch of ``1/q``
steps a member's projections are uncorrelated under Poisson sampling and negatively correlated
when records are taken once per epoch, a departure no one-run bound can see (it lies in the
curve's tails).  "Likely privacy bug" when the ledger bound rejects the claim or this check
fires (at a twentieth of the false-alarm budget).

``noise`` (:mod:`attacks.noise_check`): is the noise the claimed Gaussian, fresh every step?
In a canary-only audit the coordinates no canary touches carry noise alone; their variance,
tails and cosines across steps are tested (also at a twentieth of the budget), which catches
noise too small by 10%, truncated tails and replayed draws that no one-run bound sees.
"Likely privacy bug" when any of the three fires: at most ``1.1 (1 - confidence)`` for a
correct run (union bound).  :func:`audit_configuration` adds the key replay check
(:func:`attacks.noise_check.replay_across_runs`, at ``1e-9``).

``ceiling``: each bound when every guess is right.  ``perfect``: the same bounds for an auditor
of the exact claimed mechanism (simulated: the scores above without background), medians over
simulated runs: what any attacker could certify with these ``m`` canaries; the ratio to it says
how much of that this audit achieved.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from accountants import POISSON_GAUSSIAN, Event
from dptrain.errors import InputError

from .bounds import (
    Tradeoff,
    ceilings,
    fdp_audit,
    fdp_tests,
    ledger_tradeoff,
    one_run_audit,
)
from .noise_check import NoiseCheck, replay_across_runs, replay_verdict
from .sampling import SHARE, InclusionCheck, level

__all__ = [
    "Canaries",
    "LedgerFamily",
    "Sampler",
    "bounds_from_scores",
    "false_alarm",
    "perfect_scores",
    "whitebox_audit",
]

GRID = 16  # noise grid of the ledger-curve bound: 2^(1/16) (4.4%) apart
GRID_LOW, GRID_HIGH = -96, 64  # sigma / 64 .. 16 sigma


class Sampler(Protocol):
    def sample(self, step: int) -> Tensor: ...


# -- canaries ----------------------------------------------------------------------------------


@dataclass
class Canaries:
    """``m`` canaries: per group, coordinates ``index[g]`` (m, s_g) into the group's flattened
    parameters and unit directions ``value[g]`` (m, s_g); ``scale`` times the group's clip is
    each canary's gradient norm there."""

    groups: dict[str, list[nn.Parameter]]
    index: dict[str, Tensor]
    value: dict[str, Tensor]
    clip: dict[str, float]
    scale: float
    disjoint: frozenset[str] = frozenset()  # groups where every canary has its own coordinates
    _moved: dict[tuple[str, torch.device], Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )  # index[g] on the parameters' device

    @classmethod
    def draw(
        cls,
        groups: dict[str, list[nn.Parameter]],
        clip: dict[str, float],
        m: int,
        rng: np.random.Generator,
        *,
        scale: float = 100.0,
        support: int = 16,
    ) -> Canaries:
        if m < 2 or scale <= 1 or support < 1:
            raise ValueError("need m >= 2 canaries, scale > 1 (so they are clipped), support >= 1")
        if any(not math.isfinite(c) or c <= 0 for c in clip.values()):
            raise ValueError("the claimed plan must clip every group at a finite threshold")
        index, value, disjoint = {}, {}, set()
        for g, ps in groups.items():
            n = sum(p.numel() for p in ps)
            if n >= m:  # disjoint coordinates: canaries exactly orthogonal to each other
                s = min(support, n // m)
                idx = rng.permutation(n)[: m * s].reshape(m, s)
                disjoint.add(g)
            elif support >= n:
                s, idx = n, np.broadcast_to(np.arange(n), (m, n))
            else:  # s distinct coordinates per canary
                s = support
                idx = np.concatenate(
                    [
                        np.argpartition(rng.random((min(256, m - a), n)), s, axis=1)[:, :s]
                        for a in range(0, m, 256)
                    ]
                )
            v = rng.standard_normal((m, s))
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            index[g] = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
            value[g] = torch.from_numpy(v)
        return cls(groups, index, value, dict(clip), scale, frozenset(disjoint))

    @property
    def m(self) -> int:
        return next(iter(self.index.values())).shape[0]

    def _index_on(self, g: str, device: torch.device) -> Tensor:
        """``index[g]`` on ``device`` (moved once per device)."""
        key = (g, device)
        if key not in self._moved:
            self._moved[key] = self.index[g].to(device)
        return self._moved[key]

    def gradients(self, which: Tensor) -> dict[nn.Parameter, Tensor]:
        """Per-sample gradients ``{p: (len(which), *p.shape)}`` of canaries ``which``, built on
        the parameters' device (the values are computed on the CPU in float64, then rounded to
        the parameters' dtype and moved: the same numbers on every device)."""
        out: dict[nn.Parameter, Tensor] = {}
        k = len(which)
        for g, ps in self.groups.items():
            p0 = ps[0]
            n = sum(p.numel() for p in ps)
            flat = torch.zeros(k, n, dtype=p0.dtype, device=p0.device)
            values = (self.value[g][which] * self.scale * self.clip[g]).to(p0.dtype)
            flat.scatter_(
                1, self._index_on(g, p0.device)[which.to(p0.device)], values.to(p0.device)
            )
            start = 0
            for p in ps:
                out[p] = flat[:, start : start + p.numel()].reshape(k, *p.shape).to(p.device)
                start += p.numel()
        return out

    def flatten(self, update: dict[nn.Parameter, Tensor]) -> dict[str, Tensor]:
        """Each group's part of a released sum ``D`` as one flat tensor, where ``D`` lives."""
        return {
            g: torch.cat([update[p].detach().reshape(-1) for p in ps])
            for g, ps in self.groups.items()
        }

    def dots(
        self, update: dict[nn.Parameter, Tensor], flat: dict[str, Tensor] | None = None
    ) -> dict[str, np.ndarray]:
        """``<D|g, v_ig>`` per group ``g``, shape (m,), for a released sum ``D`` (``flat``: its
        :meth:`flatten`, if made already): the canaries' coordinates are gathered where ``D``
        lives and only they come to the CPU, where the products are summed in float64
        (casting after the gather: the same numbers as casting all of ``D`` first)."""
        flat = flat if flat is not None else self.flatten(update)
        out = {}
        for g, f in flat.items():
            picked = f[self._index_on(g, f.device)].to("cpu", torch.float64)
            out[g] = (picked * self.value[g]).sum(1).numpy()
        return out

    def _used(self, g: str) -> np.ndarray:
        """Which of group ``g``'s flat coordinates some canary touches."""
        used = np.zeros(sum(p.numel() for p in self.groups[g]), dtype=bool)
        used[self.index[g].numpy().ravel()] = True
        return used

    def free_coordinates(self, count: int, rng: np.random.Generator) -> dict[str, Tensor]:
        """Up to ``count`` coordinates, spread over the groups by size, that no canary
        touches: in a canary-only run they carry noise alone (:mod:`attacks.noise_check`)."""
        free = {g: np.flatnonzero(~self._used(g)) for g in self.groups}
        total = sum(len(f) for f in free.values())
        out = {}
        for g, f in free.items():
            k = min(len(f), math.ceil(count * len(f) / total)) if total else 0
            if k:
                out[g] = torch.from_numpy(np.sort(rng.choice(f, size=k, replace=False)))
        return out

    def common_offsets(self, count: int = 256) -> tuple[list[nn.Parameter], Tensor]:
        """Offsets free of canaries in every parameter tensor of at least 1024 elements, the
        same in each (at most ``count``, the smallest): a sampler that draws one tensor's
        noise again for the next (a counter without the tensor's place) repeats values at
        equal offsets.  Returns the tensors and the offsets (empty if fewer than 16)."""
        params = [p for ps in self.groups.values() for p in ps if p.numel() >= 1024]
        if len(params) < 2:
            return [], torch.zeros(0, dtype=torch.long, device="cpu")
        width = min(p.numel() for p in params)
        used = np.zeros(width, dtype=bool)
        for g, ps in self.groups.items():
            group_used, start = self._used(g), 0
            for p in ps:  # the tensor's own offsets below ``width``
                n = min(p.numel(), width)
                used[:n] |= group_used[start : start + n]
                start += p.numel()
        offsets = np.flatnonzero(~used)[:count]
        if len(offsets) < 16:
            return [], torch.zeros(0, dtype=torch.long, device="cpu")
        return params, torch.from_numpy(offsets)

    def blocks(
        self,
        update: dict[nn.Parameter, Tensor],
        params: list[nn.Parameter],
        offsets: Tensor,
        noise_std: dict[str, float],
    ) -> np.ndarray:
        """``(len(params), len(offsets))``: each tensor's released values at ``offsets``,
        divided by its group's noise std."""
        group_of = {p: g for g, ps in self.groups.items() for p in ps}
        rows = []
        for p in params:
            flat = update[p].detach().reshape(-1)
            v = flat[offsets.to(flat.device)].to("cpu", torch.float64).numpy()
            rows.append(v / noise_std[group_of[p]])
        return np.stack(rows)

    def noise_values(
        self, flat: dict[str, Tensor], free: dict[str, Tensor], noise_std: dict[str, float]
    ) -> np.ndarray:
        """``D[j] / s_g`` at the free coordinates ``j`` of every group ``g`` with noise
        (``flat``: :meth:`flatten` of the released sum ``D``)."""
        parts = []
        for g, idx in free.items():
            if noise_std[g] > 0:
                picked = flat[g][idx.to(flat[g].device)].to("cpu", torch.float64).numpy()
                parts.append(picked / noise_std[g])
        return np.concatenate(parts) if parts else np.zeros(0)

    def whiten(
        self,
        dots: dict[str, np.ndarray],
        noise_std: dict[str, float],
        groups: Sequence[str] | None = None,
        sigma: float | None = None,
    ) -> np.ndarray:
        """``z_i = sigma sum_{g in G} (C_g / s_g^2) <D|g, v_ig>`` over ``groups`` ``G``
        (default: all); ``sigma`` defaults to ``1 / sqrt(sum_{g in G} (C_g / s_g)^2)``, which
        makes ``z_i`` N(0, 1) for pure noise of the claimed std and ``1 / sigma`` for the
        canary's clipped gradient alone."""
        gs = list(self.groups) if groups is None else list(groups)
        if sigma is None:
            sigma = 1 / math.sqrt(sum((self.clip[g] / noise_std[g]) ** 2 for g in gs))
        return sigma * sum(dots[g] * (self.clip[g] / noise_std[g] ** 2) for g in gs)

    def projections(
        self, update: dict[nn.Parameter, Tensor], noise_std: dict[str, float], sigma: float
    ) -> np.ndarray:
        """``z_i = sigma sum_g (C_g / s_g^2) <D|g, v_ig>`` for a released sum ``D``."""
        return self.whiten(self.dots(update), noise_std, sigma=sigma)


# -- the ledger-curve family --------------------------------------------------------------------


class LedgerFamily:
    """Trade-off curves of a ledger with every noise multiplier scaled by ``2^(j/GRID)``,
    computed once each (PLD, pessimistic), and their epsilon by the run's accountant."""

    def __init__(self, events: Sequence[Event], accountant: Any, delta: float) -> None:
        if any(e.kind != POISSON_GAUSSIAN for e in events):
            raise ValueError(
                "the white-box audit tests Poisson-subsampled Gaussian ledgers only (the static "
                "policy); this ledger has other kinds of steps"
            )
        self.events = list(events)
        self.accountant = accountant
        self.delta = delta

    def scaled(self, j: int) -> list[Event]:
        f = 2.0 ** (j / GRID)
        return [
            Event(e.sample_rate, e.noise_multiplier * f, e.steps, e.kind, e.params)
            for e in self.events
        ]

    def curve(self, j: int) -> Tradeoff:
        return _curve(tuple(self.scaled(j)))

    def epsilon(self, j: int) -> float:
        acc = self.accountant
        options = repr(sorted((k, v) for k, v in vars(acc).items() if not k.startswith("_")))
        key = (type(acc), options, tuple(self.scaled(j)), self.delta)
        if key not in _EPSILONS:  # accountants are pure functions of their (public) options
            if len(_EPSILONS) > 4096:
                _EPSILONS.clear()
            _EPSILONS[key] = float(acc.epsilon(self.scaled(j), self.delta))
        return _EPSILONS[key]

    def rejects(self, scores: np.ndarray, included: np.ndarray, j: int, confidence: float):
        return fdp_tests(scores, included, [self.curve(j)], confidence)[0]

    def bound(
        self, scores: np.ndarray, included: np.ndarray, confidence: float
    ) -> dict[str, np.ndarray]:
        """Per trial: ``j`` of the least private rejected curve (bisection on the grid, the
        rejected set being upward closed), its noise factor and epsilon (0: none rejected),
        and whether the claimed curve (``j = 0``) is rejected."""
        scores, included = np.atleast_2d(scores), np.atleast_2d(included)
        n = len(scores)
        claim = self.rejects(scores, included, 0, confidence)
        lo = np.full(n, GRID_LOW - 1)  # not rejected (or below the grid)
        hi = np.full(n, GRID_HIGH)  # rejected, if anything is
        top = claim | self.rejects(scores, included, GRID_HIGH, confidence)
        lo = np.where(claim, lo, 0)
        hi = np.where(claim, 0, hi)
        while True:
            open_ = top & (hi - lo > 1)
            if not open_.any():
                break
            mid = (lo + hi) // 2
            for j in np.unique(mid[open_]):
                sel = open_ & (mid == j)
                rej = self.rejects(scores[sel], included[sel], int(j), confidence)
                hi[sel] = np.where(rej, j, hi[sel])
                lo[sel] = np.where(rej, lo[sel], j)
        eps = {int(j): self.epsilon(int(j)) for j in np.unique(hi[top])}
        return {
            "j": np.where(top, hi, GRID_HIGH + 1),
            "noise_factor": np.where(top, 2.0 ** (hi / GRID), math.inf),
            "epsilon": np.array([eps[int(j)] if t else 0.0 for j, t in zip(hi, top, strict=True)]),
            "rejects_claim": claim,
            "saturated": top & (hi == GRID_LOW),
        }


_EPSILONS: dict[tuple, float] = {}  # shared by audits of one configuration (a benchmark's seeds)


@functools.lru_cache(maxsize=512)
def _curve(events: tuple[Event, ...]) -> Tradeoff:
    """Curves are deterministic functions of the events: shared by audits of one config."""
    return ledger_tradeoff(events)


# -- scores and bounds -------------------------------------------------------------------------


def log_likelihood_ratio(z: np.ndarray, q: float, mu: float) -> np.ndarray:
    """``log(1 - q + q exp(mu z - mu^2 / 2))`` elementwise (q = 1: ``mu z - mu^2 / 2``)."""
    step = mu * z - mu * mu / 2
    if q >= 1:
        return step
    return np.logaddexp(math.log1p(-q), math.log(q) + step)


def perfect_scores(
    rng: np.random.Generator, trials: int, m: int, steps: int, q: float, mu: float
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the exact claimed mechanism (no background), ``trials`` independent runs."""
    included = rng.random((trials, m)) < 0.5
    scores = np.zeros((trials, m))
    for _ in range(steps):
        inside = included & (rng.random((trials, m)) < q)
        scores += log_likelihood_ratio(mu * inside + rng.standard_normal((trials, m)), q, mu)
    return scores, included


def bounds_from_scores(
    scores: np.ndarray, included: np.ndarray, family: LedgerFamily, delta: float, confidence: float
) -> dict[str, dict[str, np.ndarray]]:
    """The three bounds of the module docstring, batched over trials."""
    return {
        "ledger": family.bound(scores, included, confidence),
        "fdp": fdp_audit(scores, included, delta, confidence),
        "one_run": one_run_audit(scores, included, delta, confidence),
    }


def _first(d: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: v[0].item() for k, v in d.items()}


# -- the audit ---------------------------------------------------------------------------------


def whitebox_audit(
    engine: Any,
    steps: int,
    *,
    canaries: int,
    delta: float,
    delta_total: float | None = None,
    confidence: float = 0.95,
    rng: np.random.Generator | None = None,
    claim: Any = None,
    records: Callable[[Tensor], Any] | None = None,
    n_records: int = 0,
    sampler: Callable[[int, float, np.random.Generator], Sampler] | None = None,
    coins: Any = None,
    scale: float = 100.0,
    support: int = 16,
    simulations: int = 32,
    noise_values: int = 2**16,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``steps`` steps through ``engine`` with ``canaries`` white-box canaries (and,
    if given, ``n_records`` records: ``records(indices)`` is a batch of them) and audit the
    released updates; see the module docstring.  ``claim`` is the plan the run claims
    (default: the engine's next plan); ``sampler(N, q, rng)`` replaces the Poisson sampler
    (planted bugs only); ``coins`` is the Poisson sampler's :class:`~dptrain.secret.RunKey`
    (default: a fresh secret key; an insecure seed makes a benchmark reproducible).  The engine
    must have no budget filter and a fixed plan.  Without ``records``, ``noise_values``
    canary-free coordinates per step feed the noise check (:mod:`attacks.noise_check`).

    ``delta`` is the accountant's (the claimed epsilon is the accountant's at it); the
    ``(eps, delta)`` bounds (``fdp``, ``one_run``, their ceilings and ``perfect``) are tested at
    ``delta_total``, the delta the guarantee is stated at (default ``delta`` + the engine's noise
    sampler truncation term, :func:`dptrain.plan.guarantee_numbers`): a bound at a smaller delta
    tests more than the run claims.  The ``ledger`` bound is delta-free (trade-off curves)."""
    from dptrain.sampling import PoissonSampler

    t0 = time.perf_counter()
    rng = rng if rng is not None else np.random.default_rng()
    if engine.ledger.total_steps or engine.filter is not None:
        raise ValueError("the white-box audit needs a fresh engine without a budget")
    plan, event = engine.next_plan()
    claim = claim if claim is not None else plan
    if engine.policy.adaptive or event.kind != POISSON_GAUSSIAN:
        raise ValueError(
            f"the white-box audit needs a fixed Poisson-subsampled Gaussian plan; policy "
            f"'{engine.policy.name}' plans adaptively or is accounted by its own analysis. "
            "Fix: audit the same clip, noise, sampling rate and steps with policy static"
        )
    sigma = claim.noise_multiplier
    if not 0 < sigma < math.inf:
        raise ValueError(
            f"the claimed plan has noise multiplier {sigma}: there is no finite epsilon to audit"
        )
    q, mu = engine.sample_rate, 1.0 / sigma
    cs = Canaries.draw(engine.groups, claim.clip, canaries, rng, scale=scale, support=support)
    member = rng.random(canaries) < 0.5  # the secret coins
    members = torch.from_numpy(np.flatnonzero(member))
    total = n_records + len(members)
    # the coins are secret from the auditor (a fresh key), as in a run
    ids = [str(i) for i in range(total)]
    sample = sampler(total, q, rng) if sampler is not None else PoissonSampler(ids, q, coins)
    score = np.zeros(canaries)
    plain = np.zeros(canaries)
    released = 0
    # the sampling check (attacks.sampling) on the groups where canaries are orthogonal
    apart = [g for g in cs.groups if g in cs.disjoint]
    check = InclusionCheck(int(member.sum()), q, steps)
    control = InclusionCheck(int((~member).sum()), q, steps)
    # the noise check on coordinates that carry noise alone: no records, no canary there
    free = cs.free_coordinates(noise_values, _child(rng)) if records is None else {}
    noise = NoiseCheck(steps)
    tensors, offsets = cs.common_offsets() if free else ([], None)
    # one fixed shuffle of the free values, so that the freshness sketch spans every group
    width = sum(len(idx) for g, idx in free.items() if claim.noise_std[g] > 0)
    order = np.random.default_rng(width).permutation(width)

    def hook(step: int, update: dict[nn.Parameter, Tensor]) -> None:
        nonlocal score, plain, released
        sums = {p: u * engine.expected_batch_size for p, u in update.items()}
        flat = cs.flatten(sums)
        dots = cs.dots(sums, flat)
        z = cs.whiten(dots, claim.noise_std, sigma=sigma)
        score += log_likelihood_ratio(z, q, mu)
        plain += z
        if apart:
            z_apart = cs.whiten(dots, claim.noise_std, apart)
            check.update(z_apart[member])
            control.update(z_apart[~member])
        if free:
            block = cs.blocks(sums, tensors, offsets, claim.noise_std) if tensors else None
            noise.update(cs.noise_values(flat, free, claim.noise_std)[order], block)
        released += 1

    engine.add_release_hook(hook)
    inclusions = np.zeros(canaries, dtype=np.int64)
    for t in range(steps):
        idx = sample.sample(t)
        data, canary = idx[idx < n_records], members[idx[idx >= n_records] - n_records]
        inclusions[canary.numpy()] += 1
        batch = records(data) if records is not None and len(data) else None
        injected = cs.gradients(canary) if len(canary) else None
        engine.step(batch, injected=injected)
        if log and (t + 1) % max(1, steps // 4) == 0:
            log(f"white-box audit: step {t + 1}/{steps}")
    events = engine.ledger.events
    claimed = float(engine.accountant.epsilon(events, delta))
    if delta_total is None:
        term = getattr(engine.noise, "truncation_delta", None)
        delta_total = delta + (float(term(claimed)) if term is not None else 0.0)
    if not delta <= delta_total < 1:
        raise ValueError(
            f"delta_total {delta_total} must lie in [delta={delta}, 1): it is the accountant's "
            "delta plus the noise sampler's truncation term"
        )
    family = LedgerFamily(events, engine.accountant, delta)  # epsilons comparable to `claimed`
    train_seconds = time.perf_counter() - t0

    found = bounds_from_scores(score[None], member[None], family, delta_total, confidence)
    plain_fdp = fdp_audit(plain[None], member[None], delta_total, confidence)
    sims = perfect_scores(rng, simulations, canaries, steps, q, mu) if simulations else None
    perfect = bounds_from_scores(*sims, family, delta_total, confidence) if sims else None
    ceiling = ceilings(canaries, delta_total, confidence)
    every = np.arange(canaries) % 2 == 0  # any split: with every guess right, only m matters
    ceiling["ledger"] = float(
        family.bound(every[None] * 1.0, every[None], confidence)["epsilon"][0]
    )
    if apart:
        mu_apart = math.sqrt(sum((claim.clip[g] / claim.noise_std[g]) ** 2 for g in apart))
        sampling = check.result(level(confidence), mu=mu_apart, control=control)
        sampling["groups"] = len(apart)
    else:
        sampling = {
            "applicable": False,
            "flagged": False,
            "reason": f"no parameter group has {canaries} coordinates, so the canaries are not "
            "orthogonal anywhere. Fix: fewer canaries (audit.whitebox_canaries)",
        }
    if free:
        noise_result = noise.result(level(confidence))
    else:
        noise_result = {
            "applicable": False,
            "flagged": False,
            "reason": "records in the batch: no coordinate carries noise alone"
            if records is not None
            else "every coordinate carries a canary. Fix: fewer canaries or a larger model",
        }
    rejects = bool(found["ledger"]["rejects_claim"][0])

    out: dict[str, Any] = {
        "threat_model": "white box: every released update seen, canary gradients chosen",
        "canaries": canaries,
        "members": int(member.sum()),
        "mean_inclusions_per_member": float(inclusions[member].mean()) if member.any() else 0.0,
        "steps": steps,
        "released_updates": released,
        "sample_rate": q,
        "noise_multiplier": sigma,
        "clip": dict(claim.clip),
        "groups": len(claim.clip),
        "canary_scale": scale,
        "records": n_records,
        "accountant": engine.accountant.name,
        "delta": delta,
        "delta_total": delta_total,
        "confidence": confidence,
        "claimed_epsilon": claimed,
        "bounds": {k: _first(v) for k, v in found.items()},
        "plain_sum_fdp_epsilon": float(plain_fdp["epsilon"][0]),
        "ceiling": ceiling,
        "sampling": sampling,
        "noise": noise_result,
        "bound_rejects_claim": rejects,
        "privacy_bug_suspected": rejects or sampling["flagged"] or noise_result["flagged"],
        "false_alarm": (alarm := false_alarm(confidence, sampling, noise_result)),
        "false_alarm_at_most": alarm["at_most"],
        "seconds": {"training": round(train_seconds, 2)},
    }
    if perfect is not None:
        out["perfect"] = {
            "simulations": simulations,
            **{k: float(np.median(perfect[k]["epsilon"])) for k in ("ledger", "fdp", "one_run")},
            "claim_rejected_share": float(np.mean(perfect["ledger"]["rejects_claim"])),
        }
        out["ratio_to_perfect"] = {
            k: (out["bounds"][k]["epsilon"] / out["perfect"][k] if out["perfect"][k] > 0 else None)
            for k in ("ledger", "fdp", "one_run")
        }
    out["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return out


def false_alarm(
    confidence: float,
    sampling: dict[str, Any],
    noise: dict[str, Any] | None = None,
    key_replay: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """How often a CORRECT run is flagged: the ledger bound's test rejects a true claim with
    probability at most ``1 - confidence``; the sampling check and the noise check (where they
    apply) fire on a correct engine with probability at most a twentieth of that each
    (:data:`attacks.sampling.SHARE`, their own ``confidence``); "likely privacy bug" is any of
    them, so by the union bound the rates add: at most ``(1 + 2 SHARE) (1 - confidence)``, plus
    the key replay check's level where it ran (:func:`key_replay`)."""
    tests = {"ledger_bound": 1 - confidence}
    if sampling.get("applicable"):
        tests["sampling_check"] = 1 - float(sampling["confidence"])
    if noise is not None and noise.get("applicable"):
        tests["noise_check"] = 1 - float(noise["confidence"])
    if key_replay is not None:
        tests["key_replay"] = float(key_replay["alpha"])
    return {
        "confidence": confidence,
        "per_test": tests,
        "at_most": sum(tests.values()),
        "combination": "union bound: the verdict flags a run when any test fires, so the "
        f"false-alarm rates of the tests add (the sampling and noise checks run at {SHARE:g} "
        "of the bound's rate each)",
    }


def _child(rng: np.random.Generator) -> np.random.Generator:
    """An independent generator that leaves ``rng``'s own stream where it is."""
    try:
        return rng.spawn(1)[0]
    except (TypeError, ValueError):  # a bit generator without a seed sequence
        return np.random.default_rng()


# -- a finished run's own configuration ---------------------------------------------------------

KEY_REPLAY_ALPHA = 1e-9  # replayed keys give cosine 1: a tiny level costs no power


def key_replay(recipe: Any) -> dict[str, Any]:
    """Do two new runs of ``recipe`` draw the same noise or coins?  Keys from
    :func:`dptrain.train.run_key_for` in two fresh directories (never written)."""
    import tempfile
    from pathlib import Path

    from dptrain.rundir import RunDir
    from dptrain.train import run_key_for

    with tempfile.TemporaryDirectory() as tmp:
        dirs = iter(("a", "b"))
        r = replay_across_runs(
            lambda: run_key_for(recipe, RunDir(Path(tmp) / next(dirs)), False), recipe.seed
        )
    return replay_verdict(r, KEY_REPLAY_ALPHA)


def engine_check(recipe: Any, records: int = 8, batch_size: int = 4) -> dict[str, Any]:
    """The per-sample half of the mechanism, which canaries with chosen gradients bypass: the
    engine's noise-free clipped update on the run's model (its starting point) and its first
    ``records`` records against the explicit per-example loop, and the neighbour tests
    ``S(I) = S(I - y) + S(y)`` on batches collated as training collates them
    (:func:`dptrain.diagnose.check_recipe`).  Deterministic: a correct engine is within the
    tolerance whatever the draw, so it adds nothing to the false-alarm rate.  ``flagged``: not
    exact; a refusal (the check's batches cannot be compared) is reported, not flagged."""
    from dptrain.diagnose import check_recipe

    c = check_recipe(recipe, records=records, batch_size=batch_size)
    worst = max(c.layers, key=lambda r: r.error, default=None)
    return {
        "records": sum(c.batches),
        "batches": c.batches,
        "dtype": c.dtype,
        "tolerance": c.tolerance,
        "total_error": c.total_error,
        "worst_layer": None if worst is None else worst.layer,
        "neighbour_tests": len(c.neighbours),
        "neighbour_error": c.neighbour_error,
        "refusal": c.refusal,
        "exact": c.exact,
        "flagged": c.refusal is None and not c.exact,
    }


def audit_configuration(
    run_dir: Any, options: Any = None, *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """White-box audit of the privacy configuration of the finished run in ``run_dir``: a
    fresh engine with the run's model (its starting point, on ``training.device``), grouping,
    clip, sampling rate, noise, accountant and number of steps, trained on canaries only (the
    records' gradients would only add background to the canaries' projections), with fresh OS
    randomness.  It also makes two keys the way ``dptrain train`` makes a new run's and checks
    that they differ (:func:`attacks.noise_check.replay_across_runs`), and checks the engine's
    per-sample clipped gradients on the run's model (:func:`engine_check`).
    Writes ``audit/whitebox.json`` and ``audit/whitebox.html``; returns the result."""
    from accountants import Ledger
    from dptrain.hardware import resolve_device
    from dptrain.noise import GaussianNoise
    from dptrain.optim import make_optimizer
    from dptrain.policies import policy_from_recipe
    from dptrain.recipe import AuditSection, load_recipe
    from dptrain.rundir import RunDir
    from dptrain.tasks import task_for

    from .report import write_whitebox

    run = RunDir(run_dir)
    meta = run.read_meta()
    recipe = load_recipe(run.recipe)
    opts = options or recipe.audit or AuditSection()
    mechanisms = {e.key for e in Ledger.load(run.ledger).events}
    if recipe.policy.name != "static" or len(mechanisms) != 1:
        raise InputError(
            f"{run.path}: the white-box audit replays one fixed (q, sigma) plan of the static "
            f"policy; this run has policy '{recipe.policy.name}' and {len(mechanisms)} kinds of "
            "steps. Fix: audit a static run, or set audit.whitebox: false"
        )
    kind, q, sigma = next(iter(mechanisms))[:3]
    if kind != POISSON_GAUSSIAN or not 0 < sigma < math.inf:
        raise InputError(f"{run.path}: no finite-epsilon Poisson Gaussian steps to audit")
    policy = policy_from_recipe(recipe.policy)
    policy.noise_multiplier = sigma
    # the run's own model (its task's head) on the run's device
    model, _ = task_for(recipe).build_model(recipe)
    model.to(resolve_device(recipe.training.device))
    from dptrain.engine import PrivacyEngine

    engine = PrivacyEngine(
        model,
        make_optimizer(recipe.training, [p for p in model.parameters() if p.requires_grad]),
        policy=policy,
        sample_rate=q,
        dataset_size=int(meta["dataset_size"]),
        grouping=recipe.policy.grouping,
        accountant=meta.get("guarantee_accountant") or recipe.privacy.accountant,
        noise=GaussianNoise(),  # a fresh secret key
        max_length=recipe.data.max_length,  # the run's engine: the same norm paths
    )
    steps = int(meta["steps"])
    if log:
        log(
            f"white-box audit: {opts.whitebox_canaries} canaries, {steps} steps at q={q:.4g}, "
            f"sigma={sigma:.4g}, {len(engine.groups)} groups"
        )
    result = whitebox_audit(
        engine,
        steps,
        canaries=opts.whitebox_canaries,
        delta=float(meta["delta"]),
        delta_total=float(meta.get("delta_total", meta["delta"])),
        confidence=opts.confidence,
        simulations=opts.whitebox_simulations,
        log=log,
    )
    replay = result["key_replay"] = key_replay(recipe)
    result["privacy_bug_suspected"] |= replay["flagged"]
    if log:
        log("white-box audit: the engine on the run's model against the per-example loop")
    check = result["engine_check"] = engine_check(recipe)
    result["privacy_bug_suspected"] |= check["flagged"]
    alarm = false_alarm(opts.confidence, result["sampling"], result["noise"], replay)
    result["false_alarm"], result["false_alarm_at_most"] = alarm, alarm["at_most"]
    result["run_dir"] = str(run.path)
    result["run_epsilon"] = meta.get("epsilon")
    engine.detach()
    write_whitebox(run.path / "audit", result)
    return result
