"""Is the sampling Poisson?  A test on the white-box canaries' released projections.

The accountant's subsampling analysis assumes Poisson sampling: record ``i`` is in step ``t``
with probability ``q``, independently over records and steps.  The white-box auditor knows
which canaries are members and sees every release, through the whitened projections

    z_it ~ N(mu I_it, 1)        (mu = 1 / sigma, I_it the inclusion of member i in step t)

of :mod:`attacks.whitebox`.  Under Poisson sampling the inclusions are independent across
steps and the noise is fresh every step, so each member's projections are independent across
steps.  A sampler that walks through the data in epochs (a shuffle cut into batches, a fixed
order) takes each record exactly once per epoch of ``K = 1/q`` steps: inclusions in one epoch
are negatively correlated, ``Cov(I_it, I_is) = -q^2`` instead of 0, and so are the
projections, ``Cov(z_it, z_is) = -mu^2 q^2``, whatever the noise scale.

**Statistic.**  Center each step over the ``M`` members, ``y_it = z_it - mean_j z_jt``, weigh
lag ``l`` by the share of pairs at that lag that fall in one epoch, ``w_l = 1 - l q``
(``0 < l < 1/q``: the locally most powerful weights against a per-epoch shuffler of unknown
phase), and sum

    S = sum_i sum_t sum_l w_l y_it y_i,t-l,     Z = S / sqrt((M - 1) sum_t sum_l w_l^2 s_t^2 s_t-l^2)

with ``s_t^2 = sum_i y_it^2 / (M - 1)``.  Under Poisson sampling the members' rows are
independent with independent steps, so every term pairs two independent centered vectors of
steps ``t != t - l``: ``E S = 0`` and, exactly, ``Var S = (M - 1) sum w_l^2 sigma_t^2
sigma_t-l^2``, of which the denominator is an unbiased estimate (independent steps).  ``Z`` is
then asymptotically standard normal, in ``M`` or in ``T`` (a martingale over steps); an epoch
sampler pulls it down.  **Verdict**: flag "not Poisson sampling" when ``p = Phi(Z) <
alpha``, a false alarm of probability ``alpha`` (simulated in ``tests/attacks/test_sampling.py``,
from 8 members up).  The audit's verdict is "likely bug" when the bound rejects the claim (a
false alarm of at most ``1 - confidence``) *or* this check fires, so the check gets a share of
that budget, ``alpha = SHARE (1 - confidence)`` (:func:`level`), as the noise check
(:mod:`attacks.noise_check`): a correct run is flagged with probability at most
``(1 + 2 SHARE) (1 - confidence)`` (5.5% at 95%), each check's own false alarm being 0.25%.  The test needs no knowledge of ``mu`` or of the noise scale, so noise or clipping
bugs do not make it fire.

**Validity.**  The rows must be independent across members and their steps independent under
Poisson sampling: the projections are taken only on groups where the canaries have disjoint
coordinates (exactly orthogonal), and they must not respond to earlier releases.  Canary-only
audits (:func:`attacks.whitebox.audit_configuration`) satisfy both exactly.  With records in
the batch, their gradients follow the model, which earlier releases moved: a second-order
effect (learning rate over the expected batch), shown by ``control``, the same statistic on
the non-member canaries, which no sampler touches.

**Power** against a per-epoch shuffler (epochs of ``K = round(1/q)`` steps from the first
step, marginal ``p = 1/K``): ``E S = -M mu^2 p^2 sum_{t,l in one epoch} w_l`` and the
denominator is about ``sqrt(M) (1 + mu^2 p (1 - p)) sqrt(sum_{t,l} w_l^2)``, so ``Z`` is
shifted by their ratio, about ``-mu^2 q^2 sqrt(M T / (3 q))`` for small ``q``: strong for
few steps with little noise, weak for long runs at small ``q``.  A fixed-size batch drawn afresh each step (no epochs) changes
only correlations across canaries within a step (``-q (1 - q) / (N - 1)``); a test on them
sees ``T`` numbers, with a shift of about ``sqrt(T / 2) mu^2 q (1 - q) M / N``, far too little
to report.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["SHARE", "InclusionCheck", "epoch_kernel", "level", "shuffler_shift"]

MAX_LAG = 1024  # longest lag summed (an epoch of 1/q steps, capped: memory M x MAX_LAG)
MIN_MEMBERS = 8  # the normal approximation is checked by simulation from here up
SHARE = 1 / 20  # the check's share of the audit's false-alarm budget 1 - confidence


def level(confidence: float) -> float:
    """Confidence of the check inside an audit at ``confidence``: ``1 - SHARE (1 - confidence)``."""
    return 1 - SHARE * (1 - confidence)


def epoch_kernel(q: float, steps: int) -> np.ndarray:
    """Weights ``w_l = 1 - l q`` of lags ``l = 1 .. L``, ``L = ceil(1/q) - 1`` capped at
    ``steps - 1`` and :data:`MAX_LAG` (empty when ``q = 1`` or one step: nothing to test)."""
    if not 0 < q <= 1:
        raise ValueError(f"sampling rate must be in (0, 1], got {q}")
    lags = min(math.ceil(1 / q - 1e-12) - 1, steps - 1, MAX_LAG)
    lag = np.arange(1, max(lags, 0) + 1)
    return np.maximum(1 - lag * q, 0.0) if lags > 0 else np.zeros(0)


def shuffler_shift(members: int, steps: int, q: float, mu: float) -> float:
    """Expected ``Z`` of a per-epoch shuffler (module docstring): negative, 0 if untestable."""
    w = epoch_kernel(q, steps)
    if len(w) == 0 or members < MIN_MEMBERS:
        return 0.0
    k = max(2, round(1 / q))
    p = 1 / k
    lag = np.arange(1, len(w) + 1)
    full, rest = divmod(steps, k)
    same = full * np.maximum(k - lag, 0) + np.maximum(rest - lag, 0)  # pairs in one epoch
    pairs = steps - lag
    mean = -(mu**2) * p * p * float(w @ same)
    sd = (1 + mu**2 * p * (1 - p)) * math.sqrt(float(w**2 @ pairs))
    return math.sqrt(members) * mean / sd


class InclusionCheck:
    """Streaming test of the module docstring: feed :meth:`update` every step's projections
    ``z`` of the same canaries, in order; :meth:`result` gives ``Z``, its p-value and the
    verdict.  ``x[i]`` accumulates member ``i``'s share of ``S``; memory: a ring of the last
    ``L`` centered steps (``L x M``)."""

    def __init__(self, canaries: int, q: float, steps: int) -> None:
        self.q, self.steps = q, steps
        self.w = epoch_kernel(q, steps)
        self.ring = np.zeros((len(self.w), canaries))
        self.var_ring = np.zeros(len(self.w))
        self.x = np.zeros(canaries)
        self.var = 0.0  # sum_{t,l} w_l^2 s_t^2 s_{t-l}^2 (per-step variances over members)
        self.t = 0

    @property
    def lags(self) -> int:
        return len(self.w)

    def update(self, z: np.ndarray) -> None:
        y = np.asarray(z, dtype=float) - np.mean(z)
        s2 = float(y @ y) / max(len(y) - 1, 1)
        n = min(self.t, self.lags)
        if n:
            at = (self.t - np.arange(1, n + 1)) % self.lags  # lag 1 .. n
            self.x += y * (self.w[:n] @ self.ring[at])
            self.var += s2 * float(self.w[:n] ** 2 @ self.var_ring[at])
        if self.lags:
            self.ring[self.t % self.lags] = y
            self.var_ring[self.t % self.lags] = s2
        self.t += 1

    def z_score(self) -> float | None:
        """``Z`` (None when there is nothing to test)."""
        if self.lags == 0 or len(self.x) < MIN_MEMBERS or self.t < 2 or self.var <= 0:
            return None
        return float(self.x.sum()) / math.sqrt((len(self.x) - 1) * self.var)

    def result(
        self, confidence: float, *, mu: float, control: InclusionCheck | None = None
    ) -> dict[str, Any]:
        """Verdict at ``confidence``, with the power against a per-epoch shuffler at signal
        ``mu`` (the claimed one) and, if given, the control statistic (non-members)."""
        z = self.z_score()
        base: dict[str, Any] = {
            "test": "epoch-lag autocovariance of member canaries' projections (Poisson: 0)",
            "members": len(self.x),
            "steps": self.t,
            "lags": self.lags,
            "confidence": confidence,
        }
        if z is None:
            why = (
                "full batches: every member is in every step, there is no sampling to test"
                if self.q >= 1
                else f"fewer than two steps or {MIN_MEMBERS} members"
            )
            return base | {"applicable": False, "reason": why, "flagged": False}
        shift = shuffler_shift(len(self.x), self.t, self.q, mu)
        alpha = 1 - confidence
        out = base | {
            "applicable": True,
            "z": z,
            "p_value": float(stats.norm.cdf(z)),
            "flagged": bool(stats.norm.cdf(z) < alpha),
            "shuffler_shift": shift,
            "power_vs_shuffler": float(stats.norm.cdf(-shift + stats.norm.ppf(alpha))),
        }
        cz = control.z_score() if control is not None else None
        if cz is not None:
            out["control_z"] = cz
            out["control_p_value"] = float(stats.norm.cdf(cz))
        return out
