"""ROC curve, AUC, TPR at a fixed FPR and balanced accuracy of a membership score (higher =
"member").

Conventions: a threshold test is "member if score >= t", every distinct score a threshold,
tied scores on the same side (no randomized tie-breaking).  ``auc`` counts a tied
member/non-member pair as half (Mann-Whitney), so constant scores give exactly 0.5.
``tpr_at(f)`` is conservative: the best TPR of an actual threshold whose FPR is at most
``f``, no interpolation between operating points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .inputs import finite_scores, membership_bits

__all__ = ["Roc", "roc", "roc_of"]


@dataclass(frozen=True)
class Roc:
    """Operating points of "member if score >= t" over every threshold ``t`` (ties together)."""

    fpr: np.ndarray  # non-decreasing, from 0 to 1
    tpr: np.ndarray
    thresholds: np.ndarray  # fpr[i], tpr[i] are the rates of score >= thresholds[i]
    auc: float  # P[member score > non-member score] + 1/2 P[tie] (Mann-Whitney)
    positives: int
    negatives: int

    def tpr_at(self, fpr: float) -> float:
        """Largest TPR with FPR <= ``fpr`` (0 when even the strictest threshold exceeds it):
        an achievable threshold, not an interpolation.  Resolution is ``1 / negatives``:
        below that, only zero false positives qualify."""
        if not 0 <= fpr <= 1:  # NaN fails too
            raise ValueError(f"fpr must be in [0, 1], got {fpr}")
        ok = self.fpr <= fpr + 1e-12
        return float(self.tpr[ok].max()) if ok.any() else 0.0

    @property
    def balanced_accuracy(self) -> float:
        """Best ``(TPR + 1 - FPR) / 2`` over the thresholds (Carlini et al. 2022's balanced
        attack accuracy; 0.5 for scores that carry no signal)."""
        return float(np.max((self.tpr + 1 - self.fpr) / 2))

    def counts(self, i: int) -> tuple[int, int]:
        """(true positives, false positives) at operating point ``i``."""
        return round(self.tpr[i] * self.positives), round(self.fpr[i] * self.negatives)


def roc(members: np.ndarray, non_members: np.ndarray) -> Roc:
    """The ROC of scores ``members`` (positives) against ``non_members`` (negatives)."""
    pos = finite_scores(members, "member scores", ndim=1)
    neg = finite_scores(non_members, "non-member scores", ndim=1)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(
            f"a ROC needs at least one member and one non-member score, got {len(pos)} and "
            f"{len(neg)}"
        )
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tp = len(pos) - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg_sorted, thresholds, side="left")
    tpr = np.concatenate([[0.0], tp / len(pos)])
    fpr = np.concatenate([[0.0], fp / len(neg)])
    thresholds = np.concatenate([[np.inf], thresholds])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoid = Mann-Whitney
    return Roc(fpr, tpr, thresholds, auc, len(pos), len(neg))


def roc_of(scores: np.ndarray, is_member: np.ndarray) -> Roc:
    """:func:`roc` of one score per record and one membership bit per record (bools or 0/1;
    refused when the lengths differ, rather than read as indices or broadcast)."""
    s = finite_scores(scores, "scores", ndim=1)
    bits = membership_bits(is_member, "membership")
    if bits.shape != s.shape:
        raise ValueError(
            f"need one membership bit per score: {len(s)} scores, bits of shape {bits.shape}"
        )
    return roc(s[bits], s[~bits])
