"""Checks on what callers hand the attacks, metrics and bounds: refuse, with the fix named,
inputs that would otherwise give silent garbage (a NaN score ranked first, a membership bit
``2`` read as True, an int array used as an index instead of a mask)."""

from __future__ import annotations

import numpy as np

__all__ = ["finite_scores", "membership_bits", "probability"]


def finite_scores(x: object, name: str = "scores", *, ndim: int | None = None) -> np.ndarray:
    """``x`` as a float array; refuses NaN or infinite entries and, with ``ndim``, another
    number of axes."""
    a = np.asarray(x, dtype=float)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array, got shape {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(
            f"{name} must be finite: {int(bad.sum())} of {a.size} are NaN or infinite. Fix: "
            "drop or repair those records (a NaN loss is a scoring failure, not a signal)"
        )
    return a


def membership_bits(x: object, name: str = "membership") -> np.ndarray:
    """``x`` as a bool array: bools, or numbers that are all exactly 0 or 1 (anything else,
    e.g. ``2``, ``0.5`` or NaN, is refused rather than cast)."""
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be boolean (True = member), got dtype {a.dtype}")
    ok = (a == 0) | (a == 1)
    if not ok.all():
        bad = a[~ok].ravel()[:3].tolist()
        raise ValueError(f"{name} must be boolean (True = member) or 0/1, got values such as {bad}")
    return a.astype(bool)


def probability(x: float, name: str, *, open_low: bool = True, open_high: bool = True) -> float:
    """``x`` as a float in (0, 1), closed at an end where ``open_low`` / ``open_high`` is False."""
    v = float(x)
    low_ok = v > 0 if open_low else v >= 0
    high_ok = v < 1 if open_high else v <= 1
    if not (low_ok and high_ok):  # NaN fails both
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {x}")
    return v
