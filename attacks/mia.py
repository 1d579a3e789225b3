"""Membership inference attacks: each maps observations to a score per record (higher = more
likely a member).  They are registered by name in :data:`ATTACKS`; an attack returns None when
its inputs are missing (e.g. online attacks without shadow models).

Statistic.  For a language model, ``phi(x) = log_prob(x)``, the mean token log-probability of
``x`` (minus the training loss), plays the role of LiRA's logit-scaled confidence and of RMIA's
``log Pr(x | theta)``: it is a sum of many token terms, close to Gaussian across models.

- ``loss``: ``phi_target(x)`` (Yeom et al. 2018).
- ``zlib``: ``-sum_nll(x) / zlib_bits(x)`` (Carlini et al. 2021: log-perplexity over zlib
  entropy, so text that is merely easy to predict scores low).
- ``min_k``: minus the mean loss of the ``k`` fraction of least likely tokens (Shi et al. 2024).
- ``lira_offline`` (Carlini et al. 2022): ``(phi_t(x) - mu_out(x)) / sigma_out``, a monotone
  transform of LiRA's one-sided test ``Phi((phi - mu_out) / sigma_out)``, with ``mu_out`` the
  mean over the reference models that did not train on ``x``.
- ``lira_online``: ``log N(phi_t; mu_in, sigma_in^2) - log N(phi_t; mu_out, sigma_out^2)``.
  Variances are per record with at least 32 models per side, else global (pooled), as the
  paper recommends for few shadow models.
- ``rmia_offline`` / ``rmia_online`` (Zarifzadeh et al. 2024): with
  ``LR(x, z) = [Pr(x|theta) / Pr(x)] / [Pr(z|theta) / Pr(z)]``, the score is the fraction of
  population records ``z`` with ``LR(x, z) >= gamma``.  Online, ``Pr(x)`` is the mean of
  ``Pr(x|theta_k)`` over all reference models; offline, ``(1/2)((1 + a) Pr_out(x) + (1 - a))``
  over the models that did not train on ``x``.  ``a = 1`` (the default here) uses ``Pr_out``
  alone: the linear correction for ``a < 1`` was designed for classifier probabilities near 1,
  while a text's geometric-mean token probability is far below 1.

Reference models are the run's shadow models when it has them (trained by the run's recipe on
random halves of the data), else the run's own starting point ``theta_0`` (the pretrained model
for a fine-tuning run), which trained on none of the data: a single "out" model.  With one
reference, LiRA offline uses a unit variance and RMIA (``a = 1``) ranks records as LiRA offline
does, up to the resolution of the population.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .scores import TextStats

__all__ = ["ATTACKS", "ATTACK_LABELS", "TOKEN_ATTACKS", "Observations", "register_attack"]

_PER_EXAMPLE_VARIANCE = 32  # models per side needed for per-record variances
TOKEN_ATTACKS = ("zlib", "min_k")  # statistics of a token sequence: not for a classifier


@dataclass
class Observations:
    """Everything the attacks see, for ``n`` audit records and ``P`` population records."""

    target: TextStats  # the audited model on the audit records
    zlib_bits: np.ndarray | None  # (n,); None where records are not token sequences
    refs: np.ndarray  # (K, n) log_prob of each reference model on the audit records
    refs_in: np.ndarray  # (K, n) bool: the reference model trained on the record
    pop_target: np.ndarray  # (P,) log_prob of the audited model on the population
    pop_refs: np.ndarray  # (K, P)
    pop_refs_in: np.ndarray  # (K, P) bool
    min_k: float = 0.2
    rmia_gamma: float = 1.0
    rmia_offline_a: float = 1.0

    @property
    def has_in_models(self) -> bool:
        return bool(self.refs_in.any(axis=0).all() and (~self.refs_in).any(axis=0).all())


Attack = Callable[[Observations], np.ndarray | None]
ATTACKS: dict[str, Attack] = {}
ATTACK_LABELS: dict[str, str] = {}


def register_attack(name: str, label: str) -> Callable[[Attack], Attack]:
    """Decorator: make ``fn(observations) -> scores | None`` available as attack ``name``."""

    def deco(fn: Attack) -> Attack:
        ATTACKS[name] = fn
        ATTACK_LABELS[name] = label
        return fn

    return deco


@register_attack("loss", "loss threshold")
def loss_attack(o: Observations) -> np.ndarray:
    return o.target.log_prob


@register_attack("zlib", "zlib ratio")
def zlib_attack(o: Observations) -> np.ndarray | None:
    if o.zlib_bits is None:
        return None
    return -o.target.sum_nll / o.zlib_bits


@register_attack("min_k", "min-k% prob")
def min_k_attack(o: Observations) -> np.ndarray:
    return -o.target.min_k


def _masked_mean_std(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-column mean and std over rows where ``mask``, and the pooled (global) std."""
    count = mask.sum(0)
    mean = np.where(mask, x, 0.0).sum(0) / np.maximum(count, 1)
    resid = np.where(mask, x - mean, 0.0)
    var = (resid**2).sum(0) / np.maximum(count - 1, 1)
    dof = (count - 1).clip(min=0).sum()
    pooled = float(np.sqrt((resid**2).sum() / dof)) if dof > 0 else 1.0
    return mean, np.sqrt(var), pooled if pooled > 0 else 1.0


def _sigma(per_example: np.ndarray, pooled: float, count: np.ndarray) -> np.ndarray:
    return np.where(count >= _PER_EXAMPLE_VARIANCE, np.maximum(per_example, 1e-6), pooled)


@register_attack("lira_offline", "LiRA offline")
def lira_offline(o: Observations) -> np.ndarray | None:
    out = ~o.refs_in
    if not out.any(axis=0).all():
        return None
    mu, sd, pooled = _masked_mean_std(o.refs, out)
    return (o.target.log_prob - mu) / _sigma(sd, pooled, out.sum(0))


@register_attack("lira_online", "LiRA online")
def lira_online(o: Observations) -> np.ndarray | None:
    if not o.has_in_models:
        return None
    phi = o.target.log_prob
    mu_in, sd_in, pooled_in = _masked_mean_std(o.refs, o.refs_in)
    mu_out, sd_out, pooled_out = _masked_mean_std(o.refs, ~o.refs_in)
    s_in = _sigma(sd_in, pooled_in, o.refs_in.sum(0))
    s_out = _sigma(sd_out, pooled_out, (~o.refs_in).sum(0))

    def log_normal(x: np.ndarray, mu: np.ndarray, s: np.ndarray) -> np.ndarray:
        return -0.5 * ((x - mu) / s) ** 2 - np.log(s)

    return log_normal(phi, mu_in, s_in) - log_normal(phi, mu_out, s_out)


def _log_mean_exp(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = np.where(mask, x, -np.inf)
    top = x.max(0)
    return top + np.log(np.exp(x - top).sum(0) / mask.sum(0))


def _rmia(o: Observations, online: bool) -> np.ndarray | None:
    if len(o.pop_target) == 0:
        return None
    a = o.rmia_offline_a

    def log_pr(refs: np.ndarray, refs_in: np.ndarray) -> np.ndarray | None:
        if online:
            return _log_mean_exp(refs, np.ones_like(refs_in))
        out = ~refs_in
        if not out.any(axis=0).all():
            return None
        pr_out = _log_mean_exp(refs, out)
        return np.log(0.5 * ((1 + a) * np.exp(pr_out) + (1 - a)))

    px, pz = log_pr(o.refs, o.refs_in), log_pr(o.pop_refs, o.pop_refs_in)
    if px is None or pz is None:
        return None
    ratio_x = o.target.log_prob - px
    ratio_z = o.pop_target - pz
    return (ratio_x[:, None] - ratio_z[None, :] >= np.log(o.rmia_gamma)).mean(1)


@register_attack("rmia_offline", "RMIA offline")
def rmia_offline(o: Observations) -> np.ndarray | None:
    return _rmia(o, online=False)


@register_attack("rmia_online", "RMIA online")
def rmia_online(o: Observations) -> np.ndarray | None:
    if not o.has_in_models:
        return None
    return _rmia(o, online=True)
