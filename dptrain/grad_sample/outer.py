"""Per-sample gradients kept as sums of outer products, and the algebra on them.

Linear, HF Conv1D, Embedding and LoRA A/B layers all give, for sample ``b``, a weight gradient

    G_b = sum_t L_bt R_bt^T          (m x n; a vector parameter has G_b = sum_t L_bt)

with ``L`` and ``R`` the layer's output gradients and inputs (in the weight's layout) and ``t``
running over the sequence.  An :class:`Outer` keeps ``(L, R)``; ``L`` may be *indices* (an
Embedding: ``L_bt = onehot(id_bt)``).  From factors alone we get, exactly:

* inner products ``<G_b, G'_b> = sum_{t,s} (L_bt . L'_bs)(R_bt . R'_bs)`` (ghost norms, Li et al.
  2022), also between two *uses* of one weight: a tied Embedding/LM head gives the cross term
  ``sum_{t,s} g_s[id_t] (e_t . a_s)``;
* the weighted sum ``sum_b c_b G_b = L^T diag(c) R`` as one contraction (book-keeping, Bu et al.
  2023), the clipped sum without per-sample gradients;
* materialized ``G_b`` when that is cheaper.

Cost per sample: ghost norms of uses ``i, j`` take ``T_i T_j (m + n)`` multiply-adds and
``T_i T_j`` memory; materializing takes ``T m n`` multiply-adds and ``m n`` memory.
:func:`prefer_ghost` picks the cheaper (the ``T^2`` vs ``m n`` trade-off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def is_index(t: Tensor) -> bool:
    return not (torch.is_floating_point(t) or torch.is_complex(t))


@dataclass
class Outer:
    """``G_b = sum_t left_bt right_bt^T`` (``right`` None: ``G_b = sum_t left_bt``).

    ``left``: (B, T, m) values or (B, T) row indices into ``m`` rows; ``right``: (B, T, n).
    ``shape``: the parameter's shape when it is not (m, n) (a convolution's (m, c, k, ...)).
    """

    left: Tensor
    right: Tensor | None
    m: int
    shape_: tuple[int, ...] | None = None

    def __init__(
        self, left: Tensor, right: Tensor | None, m: int, shape: tuple[int, ...] | None = None
    ) -> None:
        self.left, self.right, self.m, self.shape_ = left, right, m, shape

    @property
    def batch(self) -> int:
        return self.left.shape[0]

    @property
    def length(self) -> int:
        return self.left.shape[1]

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return (self.m,) if self.right is None else (self.m, self.right.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shape_ or self.matrix_shape

    def _factors(self) -> tuple[Tensor, Tensor | None]:
        """Both factors in one accumulation dtype: float32 at least (half-precision activations
        and output gradients, e.g. under autocast, are summed in float32)."""
        dtypes = [t.dtype for t in (self.left, self.right) if t is not None and not is_index(t)]
        acc = dtypes[0]
        for d in dtypes[1:]:
            acc = torch.promote_types(acc, d)
        if acc in (torch.float16, torch.bfloat16):
            acc = torch.float32
        cast = lambda t: t if t is None or is_index(t) else t.to(acc)  # noqa: E731
        return cast(self.left), cast(self.right)

    def materialize(self) -> Tensor:
        """Per-sample gradients, (B, *shape)."""
        left, right = self._factors()
        if right is None:
            out = left.sum(1)
        elif is_index(left):
            b, t, n = right.shape
            out = right.new_zeros(b, self.m, n)
            out = out.scatter_add_(1, left.unsqueeze(-1).expand(b, t, n), right)
        else:
            out = torch.bmm(left.transpose(1, 2), right)
        return out.reshape(self.batch, *self.shape)

    def weighted_sum(self, coef: Tensor) -> Tensor:
        """``sum_b coef_b G_b`` as one contraction over batch and sequence."""
        left, right = self._factors()
        if right is None:
            return (coef.to(left.dtype) @ left.sum(1)).reshape(self.shape)
        n = right.shape[-1]
        if is_index(left):
            r = (right * coef.to(right.dtype)[:, None, None]).reshape(-1, n)
            out = r.new_zeros(self.m, n).index_add_(0, left.reshape(-1), r)
            return out.reshape(self.shape)
        if self.m <= n:  # scale the smaller factor
            left = left * coef.to(left.dtype)[:, None, None]
        else:
            right = right * coef.to(right.dtype)[:, None, None]
        return (left.reshape(-1, self.m).T @ right.reshape(-1, n)).reshape(self.shape)

    def keep(self, mask: Tensor) -> Outer:
        """The same factors with samples outside ``mask`` zeroed (so 0 * nan never happens)."""

        def zero(t: Tensor | None) -> Tensor | None:
            if t is None or is_index(t):
                return t
            return torch.where(mask.view(-1, *([1] * (t.dim() - 1))), t, 0.0)

        return Outer(zero(self.left), zero(self.right), self.m, self.shape_)

    def select(self, index: Tensor) -> Outer:
        """The factors of the samples at ``index``."""
        right = None if self.right is None else self.right[index]
        return Outer(self.left[index], right, self.m, self.shape_)


NORM_DTYPE = torch.float64
"""Norms are reduced in float64.  Gram entries are dot products in the factors' precision
(float32 at least); the cancellation that makes them inaccurate for a sample whose tokens nearly
cancel is caught by :func:`bound` (see :mod:`dptrain.clipping`)."""


def _acc(t: Tensor) -> Tensor:
    """Index factors as they are; half-precision values in float32."""
    if is_index(t) or t.dtype not in (torch.float16, torch.bfloat16):
        return t
    return t.float()


def _pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = _acc(x), _acc(y)
    if is_index(x) or is_index(y) or x.dtype == y.dtype:
        return x, y
    dt = torch.promote_types(x.dtype, y.dtype)
    return x.to(dt), y.to(dt)


def gram(x: Tensor, y: Tensor) -> Tensor:
    """``(B, Tx, Ty)`` of dot products ``x_bt . y_bs``; index factors act as one-hot rows."""
    xi, yi = is_index(x), is_index(y)
    if xi and yi:
        return x.unsqueeze(2) == y.unsqueeze(1)
    if xi:  # y[b, s, x[b, t]]
        return torch.gather(y, 2, x.unsqueeze(1).expand(-1, y.shape[1], -1)).transpose(1, 2)
    if yi:
        return gram(y, x).transpose(1, 2)
    return torch.bmm(x, y.transpose(1, 2))


def inner(f: Outer, g: Outer) -> Tensor:
    """``<G_b, G'_b>`` for every sample, from factors only (float64, shape (B,))."""
    if f.right is None or g.right is None:
        if f.right is not None or g.right is not None or is_index(f.left) or is_index(g.left):
            raise ValueError("inner product of a vector and a matrix gradient")
        return (f.left.sum(1).to(NORM_DTYPE) * g.left.sum(1).to(NORM_DTYPE)).sum(1)
    fl, gl = _pair(f.left, g.left)
    fr, gr = _pair(f.right, g.right)
    if f.length == 1 and g.length == 1 and not (is_index(fl) or is_index(gl)):
        return (fl[:, 0] * gl[:, 0]).sum(1).to(NORM_DTYPE) * (fr[:, 0] * gr[:, 0]).sum(1).to(
            NORM_DTYPE
        )
    return _gram_dot(gram(fl, gl), gram(fr, gr))


def _gram_dot(left: Tensor, right: Tensor) -> Tensor:
    """``sum_{t,s} left_bts right_bts`` per sample in float64 (a bool ``left``: a mask).

    The products are taken in float64 into one float64 copy of ``left`` (``right`` is cast
    element by element inside the multiply, no second copy).  That is the product of the two
    float64 casts: a product of two float32 (or float16, bfloat16) values is exact in float64,
    so the reduced values are bit for bit those of ``(left.double() * right.double()).sum``.
    Only for contiguous Gram matrices (bmm's and gather's outputs), where both products are
    laid out alike and the float64 sum adds in the same order; a transposed one (an index
    factor's Gram against a dense one) takes the two casts."""
    if left.dtype == torch.bool:
        return torch.where(left, right, 0.0).to(NORM_DTYPE).sum((1, 2))
    if left.is_contiguous() and right.is_contiguous() and left.shape == right.shape:
        return left.to(NORM_DTYPE, copy=True).mul_(right).sum((1, 2))
    return (left.to(NORM_DTYPE) * right.to(NORM_DTYPE)).sum((1, 2))


def bound(f: Outer) -> Tensor:
    """``S_b = sum_t ||L_bt|| ||R_bt||`` (float64, (B,)): ``||G_b|| <= S_b`` by the triangle
    inequality.  ``S_b / ||G_b||`` measures how much a sample's tokens cancel."""
    left = torch.ones(f.left.shape[:2], dtype=NORM_DTYPE, device=f.left.device)
    if not is_index(f.left):
        left = torch.linalg.vector_norm(_acc(f.left), dim=-1).to(NORM_DTYPE)
    if f.right is None:
        return left.sum(1)
    return (left * torch.linalg.vector_norm(_acc(f.right), dim=-1).to(NORM_DTYPE)).sum(1)


def _self_term(f: Outer) -> tuple[Tensor, Tensor]:
    """``(inner(f, f), bound(f))``, the bound's token norms read off the diagonals of the two
    Gram matrices the inner product forms anyway (``||L_bt||^2 = (L L^T)_btt``): the same
    inner product, and no second pass over the factors (the largest, the LM head's output
    gradient, is ``B T V``).  The diagonal entries are float32 dot products (relative
    rounding ``gamma``, as the norms they replace); the bound only selects the samples that
    :mod:`dptrain.clipping` materializes, with a margin of 64."""
    if f.right is None or f.length == 1:
        return inner(f, f), bound(f)
    fl, fr = _pair(f.left, f.left)[0], _pair(f.right, f.right)[0]
    left, right = gram(fl, fl), gram(fr, fr)

    def norms(g: Tensor) -> Tensor:
        if g.dtype == torch.bool:  # one-hot rows: norm 1
            return torch.ones(g.shape[:2], dtype=NORM_DTYPE, device=g.device)
        return g.diagonal(dim1=1, dim2=2).to(NORM_DTYPE).clamp(min=0).sqrt()

    return _gram_dot(left, right), (norms(left) * norms(right)).sum(1)


def norm_sq_and_bound(factors: list[Outer]) -> tuple[Tensor, Tensor]:
    """:func:`norm_sq` and ``sum_i bound(G_i)`` of one parameter's uses, in one pass."""
    total, s = _self_term(factors[0])
    for i, f in enumerate(factors):
        if i:
            v, b = _self_term(f)
            total, s = total + v, s + b
        for g in factors[:i]:
            total = total + 2 * inner(f, g)
    return total, s


def norm_sq(factors: list[Outer]) -> Tensor:
    """``||sum_i G_i,b||^2`` for uses ``i`` of one parameter, with all cross terms."""
    total = inner(factors[0], factors[0])
    for i, f in enumerate(factors):
        if i:
            total = total + inner(f, f)
        for g in factors[:i]:
            total = total + 2 * inner(f, g)
    return total


def _dim(t: Tensor) -> int:
    return 1 if is_index(t) else t.shape[-1]


def ghost_cost(factors: list[Outer]) -> int:
    """Multiply-adds per sample of :func:`norm_sq` (Gram matrices of left and right factors)."""
    cost = 0
    for i, f in enumerate(factors):
        for g in factors[: i + 1]:
            per_pair = _dim(f.left) + (0 if f.right is None else _dim(f.right))
            cost += f.length * g.length * per_pair
    return cost


def prefer_ghost(factors: list[Outer]) -> bool:
    """Ghost norms when their multiply-adds, ``sum_{i<=j} T_i T_j (m + n)``, are fewer than those
    of materializing, ``sum_i T_i m n`` (Li et al. 2022's ``T^2`` against ``m n`` per use).

    Materializing is never cheaper than that count: its batched products have a short inner
    axis ``T`` and write ``B m n`` values, while the ghost path's weighted sum is one long
    contraction that replaces the ordinary parameter gradient (measured in
    ``benchmarks/step_time.py``).  It also needs ``B m n`` memory against ghost's ``B T^2``.
    Vector parameters (biases) are summed directly: ``||sum_t L_bt||`` costs ``T m``.
    """
    f = factors[0]
    if f.right is None:
        return False
    m, n = f.matrix_shape
    return ghost_cost(factors) < sum(g.length for g in factors) * m * n
