"""ROC curve, AUC and TPR at a fixed FPR of a membership score (higher = "member")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Roc", "roc"]


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
        """Largest TPR with FPR <= ``fpr`` (0 when even the strictest threshold exceeds it).
        Resolution is ``1 / negatives``: below that, only zero false positives qualify."""
        ok = self.fpr <= fpr + 1e-12
        return float(self.tpr[ok].max()) if ok.any() else 0.0

    def counts(self, i: int) -> tuple[int, int]:
        """(true positives, false positives) at operating point ``i``."""
        return round(self.tpr[i] * self.positives), round(self.fpr[i] * self.negatives)


def roc(members: np.ndarray, non_members: np.ndarray) -> Roc:
    """The ROC of scores ``members`` (positives) against ``non_members`` (negatives)."""
    pos = np.asarray(members, dtype=float)
    neg = np.asarray(non_members, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("a ROC needs at least one member and one non-member score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("membership scores must be finite")
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tp = len(pos) - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg_sorted, thresholds, side="left")
    tpr = np.concatenate([[0.0], tp / len(pos)])
    fpr = np.concatenate([[0.0], fp / len(neg)])
    thresholds = np.concatenate([[np.inf], thresholds])
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoid = Mann-Whitney
    return Roc(fpr, tpr, thresholds, auc, len(pos), len(neg))
