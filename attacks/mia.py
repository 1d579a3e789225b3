"""Membership inference attacks: each maps observations to a score per record (higher = more
likely a member).  They are registered by name in :data:`ATTACKS`; an attack returns None when
its inputs are missing (e.g. online attacks without shadow models).

Statistic.  For a language model, ``phi(x) = log_prob(x)``, the mean token log-probability of
``x`` (minus the training loss), plays the role of LiRA's logit-scaled confidence and of RMIA's
``log Pr(x | theta)``: it is a sum of many token terms, close to Gaussian across models.

- ``loss``: ``phi_target(x)`` (Yeom et al. 2018).
- ``zlib``: ``-mean_nll(x) / zlib_bits(x)`` (Carlini et al. 2021: the log-perplexity, i.e.
  the mean token loss, over the zlib entropy, so text that is merely easy to predict, being
  also easy to compress, scores low).
- ``min_k``: minus the mean loss of the ``k`` fraction of least likely tokens (Shi et al. 2024).
- For a classifier (``single_label``: one label per record, ``log_prob = log p_y``) LiRA
  uses the paper's logit scaling ``phi = log(p_y / (1 - p_y))`` instead: ``log p_y`` piles up
  just below 0 for confident records and is far from Gaussian there.  The loss is floored
  at ``1e-12`` (a probability that rounds to 1 would map to +inf), so such records tie.
- ``lira_offline`` (Carlini et al. 2022): ``(phi_t(x) - mu_out(x)) / sigma_out``, a monotone
  transform of LiRA's one-sided test ``Phi((phi - mu_out) / sigma_out)``, with ``mu_out`` the
  mean over the reference models that did not train on ``x``.
- ``lira_online``: ``log N(phi_t; mu_in, sigma_in^2) - log N(phi_t; mu_out, sigma_out^2)``.
  Variances are per record with at least 32 models per side, else global (pooled), as the
  paper recommends for few shadow models.
- ``rmia_offline`` / ``rmia_online`` (Zarifzadeh et al. 2024): with
  ``LR(x, z) = [Pr(x|theta) / Pr(x)] / [Pr(z|theta) / Pr(z)]``, the score is the fraction of
  population records ``z`` with ``LR(x, z) >= gamma`` (ties count: ``>=``).  Online, ``Pr(x)`` is the mean of
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

from .inputs import finite_scores, membership_bits, probability
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
    single_label: bool = False  # a classifier's records: LiRA on logit-scaled p_y

    def __post_init__(self) -> None:
        """Refuse inputs the attacks would turn into silent garbage: mismatched shapes,
        NaN/inf statistics, membership that is not 0/1, parameters out of range."""
        n = len(self.target.mean_nll)
        finite_scores(self.target.log_prob, "the audited model's log-probabilities", ndim=1)
        if self.zlib_bits is not None:
            z = finite_scores(self.zlib_bits, "zlib_bits", ndim=1)
            if len(z) != n or (z <= 0).any():
                raise ValueError(f"zlib_bits needs one positive size per record ({n})")
        self.refs = finite_scores(self.refs, "reference log-probabilities", ndim=2)
        self.refs_in = membership_bits(self.refs_in, "refs_in")
        self.pop_target = finite_scores(self.pop_target, "population log-probabilities", ndim=1)
        self.pop_refs = finite_scores(self.pop_refs, "population reference log-probs", ndim=2)
        self.pop_refs_in = membership_bits(self.pop_refs_in, "pop_refs_in")
        k, p = len(self.refs), len(self.pop_target)
        shapes = {
            "refs": (self.refs.shape, (k, n)),
            "refs_in": (self.refs_in.shape, (k, n)),
            "pop_refs": (self.pop_refs.shape, (k, p)),
            "pop_refs_in": (self.pop_refs_in.shape, (k, p)),
        }
        for name, (got, want) in shapes.items():
            if got != want:
                raise ValueError(
                    f"{name} has shape {got}, expected {want} (reference models x records)"
                )
        if k < 1:
            raise ValueError("need at least one reference model (theta_0 will do)")
        probability(self.min_k, "min_k", open_high=False)
        probability(self.rmia_offline_a, "rmia_offline_a", open_low=False, open_high=False)
        if not (self.rmia_gamma > 0 and np.isfinite(self.rmia_gamma)):
            raise ValueError(f"rmia_gamma must be positive and finite, got {self.rmia_gamma}")

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
    return -o.target.mean_nll / o.zlib_bits


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


_MIN_LOSS = 1e-12  # floor of a classifier's loss before logit scaling (p = 1 would be +inf)


def logit_confidence(log_prob: np.ndarray) -> np.ndarray:
    """LiRA's ``phi = log(p / (1 - p))`` from ``log p`` (Carlini et al. 2022), with the loss
    ``-log p`` floored at :data:`_MIN_LOSS`."""
    lp = np.minimum(np.asarray(log_prob, dtype=float), -_MIN_LOSS)
    return lp - np.log(-np.expm1(lp))


def _lira_stats(o: Observations) -> tuple[np.ndarray, np.ndarray]:
    """LiRA's statistic on the audited model and on the reference models."""
    if o.single_label:
        return logit_confidence(o.target.log_prob), logit_confidence(o.refs)
    return o.target.log_prob, o.refs


@register_attack("lira_offline", "LiRA offline")
def lira_offline(o: Observations) -> np.ndarray | None:
    out = ~o.refs_in
    if not out.any(axis=0).all():
        return None
    phi, refs = _lira_stats(o)
    mu, sd, pooled = _masked_mean_std(refs, out)
    return (phi - mu) / _sigma(sd, pooled, out.sum(0))


@register_attack("lira_online", "LiRA online")
def lira_online(o: Observations) -> np.ndarray | None:
    if not o.has_in_models:
        return None
    phi, refs = _lira_stats(o)
    mu_in, sd_in, pooled_in = _masked_mean_std(refs, o.refs_in)
    mu_out, sd_out, pooled_out = _masked_mean_std(refs, ~o.refs_in)
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
    ratio_z = np.sort(o.pop_target - pz)
    # LR(x, z) >= gamma  <=>  ratio_z <= ratio_x - log gamma: count by binary search, O((n + P)
    # log P) instead of an (n, P) table
    return np.searchsorted(ratio_z, ratio_x - np.log(o.rmia_gamma), side="right") / len(ratio_z)


@register_attack("rmia_offline", "RMIA offline")
def rmia_offline(o: Observations) -> np.ndarray | None:
    return _rmia(o, online=False)


@register_attack("rmia_online", "RMIA online")
def rmia_online(o: Observations) -> np.ndarray | None:
    if not o.has_in_models:
        return None
    return _rmia(o, online=True)
