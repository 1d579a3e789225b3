"""Is the released noise the claimed Gaussian?  Tests on coordinates that carry only noise.

In a canary-only white-box audit (:func:`attacks.whitebox.audit_configuration`) a coordinate
that no canary touches receives, in step ``t``, only the mechanism's noise: the released sum
there is ``D_t[j] = s_g x_tj`` with ``s_g`` the claimed noise std of its group and, for a
correct engine, ``x_tj`` independent standard normals over coordinates and steps.  The auditor
reads ``x_tj = D_t[j] / s_g`` on ``n`` such coordinates per step (:class:`NoiseCheck`) and
tests, each one-sided in the direction that over-reports privacy:

* **scale**: ``Q = sum x^2`` over all ``N = n T`` values is ``chi^2_N``; noise smaller than
  claimed (a wrong std, a dropped factor) pulls ``Q`` down: p-value ``P(chi^2_N <= Q)``.
* **tails**: for ``k`` in 2 .. 6 where ``N P(|x| > k) >= 25``, the count of ``|x| > k`` is
  ``Binomial(N, 2 Phi(-k))``; a sampler with truncated tails (the accountant assumes the full
  Gaussian) has too few: p-value ``P(Binomial <= count)``.  Truncation at ``3 sigma`` also
  shrinks the variance by 2.7%, which the scale test sees as well.
* **freshness**: each step's first ``sketch`` values form a vector ``u_t``; steps whose noise
  is independent give cosines ``c`` with ``(1 + c) / 2 ~ Beta((K-1)/2, (K-1)/2)`` exactly
  (``K`` = ``sketch``: the direction of a standard normal vector is uniform); replayed noise
  (a counter that does not advance, a resume that redraws old steps) gives ``|c|`` near 1.
  Two-sided on ``max |c|`` over pairs of the kept steps (every ``stride``-th from step 0,
  ``stride = ceil(steps / keep)``: at most ``keep``), Bonferroni over the pairs; a replay
  between two steps that are not both kept goes unseen.
* **tensors**: the same cosine test between the parameter tensors of one step, at equal
  offsets (``blocks``, one row per tensor): a sampler that restarts its counter for every
  tensor repeats values there.  Bonferroni over all pairs of all steps.

Each test runs at ``alpha / m`` (``m`` tests: Bonferroni), so a correct engine is flagged with
probability at most ``alpha``.  None of the tests needs the clip, the sampling or the
canaries: they are about the noise alone.  They do not see noise that is correct on the
audited coordinates but wrong elsewhere, nor dependence other than a repeat (a cosine).

:func:`replay_across_runs` tests the other way noise can be replayed: two runs of one
recipe getting the same key (a key derived from the public recipe seed).  It makes two keys
the way ``dptrain train`` does and compares their first step's noise and coins.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["NoiseCheck", "replay_across_runs", "replay_verdict"]

TAIL_KS = (2.0, 3.0, 4.0, 5.0, 6.0)
MIN_EXPECTED = 25.0  # a tail is tested when N P(|x| > k) reaches this many expected values
_BLOCK = 1024  # rows of the pairwise cosine matrix computed at once


def cosine_tail(c: float, k: int) -> float:
    """``P(|cos| >= c)`` for two independent isotropic vectors of ``k`` coordinates:
    ``(1 + cos) / 2 ~ Beta((k - 1) / 2, (k - 1) / 2)``, two-sided."""
    half = (k - 1) / 2
    return 2 * float(stats.beta.sf((1 + abs(c)) / 2, half, half))


class NoiseCheck:
    """Streaming tests of the module docstring: :meth:`update` with each step's standardized
    values ``x`` (same coordinates every step, in order), then :meth:`result`."""

    def __init__(self, steps: int, *, sketch: int = 512, keep: int = 512) -> None:
        if sketch < 8 or keep < 2:
            raise ValueError("need sketch >= 8 values and keep >= 2 steps")
        self.sketch, self.keep = sketch, keep
        self.stride = max(1, math.ceil(steps / keep))
        self.count = 0  # values seen
        self.square_sum = 0.0
        self.beyond = np.zeros(len(TAIL_KS), dtype=np.int64)
        self.kept: list[np.ndarray] = []
        self.kept_steps: list[int] = []
        self.steps = 0
        self.width: int | None = None
        self.across = 0.0  # max |cosine| between two tensors' blocks of one step
        self.across_at: tuple[int, int, int] | None = None  # (step, tensor, tensor)
        self.across_pairs = 0
        self.block_width = 0

    def update(self, x: np.ndarray, blocks: np.ndarray | None = None) -> None:
        """One step's values ``x`` and, optionally, ``blocks`` (tensors x offsets)."""
        if blocks is not None and len(blocks) >= 2:
            self._update_blocks(np.asarray(blocks, dtype=np.float64))
        x = np.asarray(x, dtype=np.float64).ravel()
        if self.width is None:
            self.width = len(x)
        elif len(x) != self.width:
            raise ValueError(f"step {self.steps} has {len(x)} values, earlier ones {self.width}")
        if not np.isfinite(x).all():
            raise ValueError(f"step {self.steps}'s noise coordinates are not finite")
        self.count += len(x)
        self.square_sum += float(x @ x)
        ax = np.abs(x)
        self.beyond += np.array([int((ax > k).sum()) for k in TAIL_KS])
        if self.steps % self.stride == 0 and len(self.kept) < self.keep and len(x) >= 8:
            u = x[: self.sketch]
            n = float(np.linalg.norm(u))
            if n > 0:
                self.kept.append((u / n).astype(np.float64))
                self.kept_steps.append(self.steps)
        self.steps += 1

    def _update_blocks(self, b: np.ndarray) -> None:
        if not np.isfinite(b).all():
            raise ValueError(f"step {self.steps}'s noise blocks are not finite")
        n = np.linalg.norm(b, axis=1, keepdims=True)
        u = b / np.where(n > 0, n, 1.0)
        c = np.abs(u @ u.T)
        np.fill_diagonal(c, 0.0)
        i, j = np.unravel_index(int(np.argmax(c)), c.shape)
        if c[i, j] > self.across:
            self.across, self.across_at = float(c[i, j]), (self.steps, int(i), int(j))
        self.across_pairs += len(b) * (len(b) - 1) // 2
        self.block_width = b.shape[1]

    def _tensors(self) -> dict[str, Any] | None:
        if not self.across_pairs:
            return None
        tail = cosine_tail(self.across, self.block_width)
        return {
            "test": "max |cosine| between parameter tensors' noise at equal offsets",
            "pairs": self.across_pairs,
            "offsets": self.block_width,
            "max_abs_cosine": self.across,
            "at": list(self.across_at) if self.across_at else None,  # (step, tensor, tensor)
            "p_value": min(1.0, tail * self.across_pairs),
        }

    def _scale(self) -> dict[str, Any]:
        n, q = self.count, self.square_sum
        return {
            "test": "sum of squares vs chi^2 (noise smaller than claimed)",
            "values": n,
            "variance_ratio": q / n,
            "p_value": float(stats.chi2.cdf(q, n)),
        }

    def _tails(self) -> list[dict[str, Any]]:
        out = []
        for k, c in zip(TAIL_KS, self.beyond, strict=True):
            p = 2 * float(stats.norm.sf(k))
            if self.count * p < MIN_EXPECTED:
                continue
            out.append(
                {
                    "test": f"count of |x| > {k:g} vs Binomial (truncated tails)",
                    "k": k,
                    "count": int(c),
                    "expected": self.count * p,
                    "p_value": float(stats.binom.cdf(int(c), self.count, p)),
                }
            )
        return out

    def _freshness(self) -> dict[str, Any] | None:
        if len(self.kept) < 2:
            return None
        u = np.stack(self.kept)  # (S, K) unit rows
        k, s = u.shape[1], len(u)
        worst, pair = 0.0, (0, 1)
        for a in range(0, s, _BLOCK):
            c = np.abs(u[a : a + _BLOCK] @ u.T)  # rows a.., every column
            rows = np.arange(a, min(a + _BLOCK, s))
            c[rows - a, rows] = 0.0  # a step with itself
            i, j = np.unravel_index(int(np.argmax(c)), c.shape)
            if c[i, j] > worst:
                worst, pair = float(c[i, j]), (a + int(i), int(j))
        pairs = s * (s - 1) // 2
        tail = cosine_tail(worst, k)  # one pair
        return {
            "test": "max |cosine| between steps' noise (replayed noise)",
            "steps_kept": s,
            "stride": self.stride,
            "sketch": k,
            "max_abs_cosine": worst,
            "steps": [self.kept_steps[pair[0]], self.kept_steps[pair[1]]],
            "p_value": min(1.0, tail * pairs),  # Bonferroni over the pairs
        }

    def result(self, confidence: float) -> dict[str, Any]:
        """Verdict at ``confidence``: flagged when a test's p-value is below
        ``(1 - confidence) / m``."""
        if self.count == 0:
            return {"applicable": False, "flagged": False, "reason": "no noise values were read"}
        tests: dict[str, Any] = {"scale": self._scale()}
        for t in self._tails():
            tests[f"tail_{t['k']:g}"] = t
        fresh = self._freshness()
        if fresh is not None:
            tests["freshness"] = fresh
        across = self._tensors()
        if across is not None:
            tests["tensors"] = across
        alpha = (1 - confidence) / len(tests)
        failed = [name for name, t in tests.items() if t["p_value"] < alpha]
        return {
            "applicable": True,
            "test": "released noise on canary-free coordinates is N(0, claimed std^2), fresh",
            "values_per_step": self.width,
            "steps": self.steps,
            "confidence": confidence,
            "alpha_per_test": alpha,
            "tests": tests,
            "failed": failed,
            "flagged": bool(failed),
        }


def replay_across_runs(make_key: Callable[[], Any], seed: int, *, n: int = 4096) -> dict[str, Any]:
    """Two keys made by ``make_key`` (the way ``dptrain train`` makes one for a new run, with
    torch and numpy seeded by the recipe's public ``seed`` before each, as a run does) and
    their step-0 noise (``n`` values) and Poisson coins (``n`` records at q = 1/2).  The
    process's torch and numpy generators are restored afterwards."""
    import torch

    from dptrain.noise import GaussianNoise
    from dptrain.sampling import PoissonSampler

    draws = []
    saved = torch.get_rng_state(), np.random.get_state()
    try:
        for _ in range(2):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            key = make_key()
            noise = GaussianNoise(key)
            noise.begin_step(0)
            x = noise(torch.zeros(n, dtype=torch.float64, device="cpu"), 1.0).numpy()
            coins = PoissonSampler([str(i) for i in range(n)], 0.5, key).mask(0)
            draws.append((key, x, coins))
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
    (k1, x1, c1), (k2, x2, c2) = draws
    cosine = float(x1 @ x2 / (np.linalg.norm(x1) * np.linalg.norm(x2)))
    agree = int((c1 == c2).sum())
    return {
        "test": "two new runs of one recipe draw different noise and coins",
        "secure_keys": bool(k1.secure and k2.secure),
        "same_key": k1.key_id == k2.key_id,
        "noise_cosine": cosine,
        "noise_p_value": cosine_tail(cosine, n),
        "coin_agreement": agree / n,
        "coin_p_value": 2
        * float(min(stats.binom.sf(agree - 1, n, 0.5), stats.binom.cdf(agree, n, 0.5))),
    }


def replay_verdict(r: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Flag when secure keys (no ``privacy.insecure_seed``) repeat across runs: the same key,
    or noise or coins that agree beyond chance (each at ``alpha / 2``).  An insecure seed
    replays by design; the report says so instead."""
    replayed = r["same_key"] or min(r["noise_p_value"], r["coin_p_value"]) < alpha / 2
    return r | {
        "alpha": alpha,
        "replayed": bool(replayed),
        "flagged": bool(replayed and r["secure_keys"]),
    }
