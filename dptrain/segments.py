"""Rows grouped into segments (a person's records): per-segment gradients from per-row parts.

With a segment id ``s(b)`` per row ``b`` (one person per segment), the gradient of segment
``p`` is ``G_p = sum_{b: s(b) = p} G_b``.  For a factorized part ``G_b = sum_t L_bt R_bt^T``
(:class:`~dptrain.grad_sample.Outer`) this is again one outer-product sum, over the tokens of
all of that person's rows: ``G_p = sum_{b in p} sum_t L_bt R_bt^T``.  So a person's factors are
the concatenation of their rows' factors along the sequence axis, and every identity of
:mod:`dptrain.grad_sample.outer` holds per person, exactly:

    ||G_p||^2 = sum_{r, s in p} <G_r, G_s> = sum_{r, s in p} sum_{t, u} (L_rt . L_su)(R_rt . R_su)

(the Gram matrix over the tokens of one person's records, cross-record terms included), the
clipped sum ``sum_p c_p G_p`` as one contraction, and the triangle bound ``S_p`` used by the
cancellation check.  No per-record gradient is materialized on that path.  Materialized
per-row gradients are summed per segment (``index_add``).

Layout.  Persons are padded to the largest number of rows ``k`` among them: factors become
``(P, k T, .)`` with zero rows for padding (index factors keep a valid index and a zero right
factor), so a padded token contributes exactly zero to every product.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .grad_sample.outer import Outer, is_index


@dataclass(frozen=True)
class Segments:
    """``rows[p, j]``: the row of person ``p``'s ``j``-th record, ``-1`` past their count."""

    rows: Tensor  # (P, k) int64
    of_row: Tensor  # (B,) int64: the segment of each row

    @classmethod
    def from_ids(cls, segment_of_row: Tensor) -> Segments:
        """From per-row segment ids ``0 .. P-1`` (every id in that range used at least once);
        ``rows`` is made on the ids' device."""
        seg = segment_of_row.reshape(-1).long()
        if seg.numel() == 0:
            return cls(torch.zeros((0, 0), dtype=torch.long, device=seg.device), seg)
        p = int(seg.max()) + 1
        counts = torch.bincount(seg, minlength=p)
        if bool((counts == 0).any()) or int(seg.min()) < 0:
            raise ValueError("segment ids must be 0 .. P-1 with every id used")
        k = int(counts.max())
        order = torch.argsort(seg, stable=True)
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(seg.numel(), device=seg.device) - start[seg[order]]
        rows = torch.full((p, k), -1, dtype=torch.long, device=seg.device)
        rows[seg[order], slot] = order
        return cls(rows, seg)

    @property
    def count(self) -> int:
        return self.rows.shape[0]

    def to(self, device: torch.device) -> Segments:
        return Segments(self.rows.to(device), self.of_row.to(device))


def _gather(t: Tensor, rows: Tensor, pad: Tensor) -> Tensor:
    """``t[rows]`` with padded slots zeroed (values) or kept as a valid index (indices), the
    row axis folded into the sequence axis: ``(P, k T, ...)``."""
    g = t[rows.clamp(min=0)]  # (P, k, T, ...)
    if not is_index(t):
        g = torch.where(pad.view(*pad.shape, *([1] * (g.dim() - 2))), torch.zeros_like(g), g)
    return g.reshape(rows.shape[0], rows.shape[1] * t.shape[1], *t.shape[2:])


def group_outer(f: Outer, seg: Segments) -> Outer:
    """The per-segment factors of ``f`` (see the module docstring)."""
    rows = seg.rows.to(f.left.device)
    pad = rows < 0
    if f.right is None and is_index(f.left):
        raise ValueError("an index factor needs a right factor to be padded")
    left = _gather(f.left, rows, pad)
    right = None if f.right is None else _gather(f.right, rows, pad)
    return Outer(left, right, f.m, f.shape_)


def group_rows(t: Tensor, seg: Segments) -> Tensor:
    """``(P, *shape)`` per-segment sums of per-row tensors ``(B, *shape)``."""
    out = t.new_zeros((seg.count, *t.shape[1:]))
    return out.index_add_(0, seg.of_row.to(t.device), t)


def person_chunks(of_row: Tensor, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of rows sorted by segment, each holding whole segments and at
    most ``size`` rows (a segment with more rows than ``size`` gets a range of its own)."""
    n = of_row.numel()
    if n == 0:
        return []
    seg = of_row.tolist()
    if any(b < a for a, b in itertools.pairwise(seg)):
        raise ValueError("rows must be sorted by segment (a person's records contiguous)")
    bounds = [0] + [i for i in range(1, n) if seg[i] != seg[i - 1]] + [n]
    chunks: list[tuple[int, int]] = []
    start = 0
    for a, b in itertools.pairwise(bounds):
        if b - start > size and a > start:
            chunks.append((start, a))
            start = a
    chunks.append((start, n))
    return chunks
