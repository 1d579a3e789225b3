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

import functools
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

    @property
    def accumulation_dtype(self) -> torch.dtype:
        """The dtype of :meth:`materialize` and :meth:`weighted_sum`: the factors' dtypes
        promoted, float32 at least (half-precision activations and output gradients, e.g.
        under autocast, are summed in float32)."""
        dtypes = [t.dtype for t in (self.left, self.right) if t is not None and not is_index(t)]
        acc = dtypes[0]
        for d in dtypes[1:]:
            acc = torch.promote_types(acc, d)
        if acc in (torch.float16, torch.bfloat16):
            acc = torch.float32
        return acc

    def _factors(self) -> tuple[Tensor, Tensor | None]:
        """Both factors in the accumulation dtype."""
        acc = self.accumulation_dtype
        cast = lambda t: t if t is None or is_index(t) else t.to(acc)  # noqa: E731
        return cast(self.left), cast(self.right)

    def materialize(self) -> Tensor:
        """Per-sample gradients, (B, *shape)."""
        left, right = self._factors()
        if right is None:  # summed over tokens in float64, one rounding into left's dtype
            out = left.sum(1, dtype=NORM_DTYPE).to(left.dtype)
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
        if right is None:  # float64 sums, one rounding into left's dtype
            out = coef.to(NORM_DTYPE) @ left.sum(1, dtype=NORM_DTYPE)
            return out.to(left.dtype).reshape(self.shape)
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

    def rows(self, rows: slice) -> Outer:
        """The factors of the samples in ``rows`` (views)."""
        return Outer(
            self.left[rows], None if self.right is None else self.right[rows], self.m, self.shape_
        )

    def select(self, index: Tensor) -> Outer:
        """The factors of the samples at ``index``."""
        right = None if self.right is None else self.right[index]
        return Outer(self.left[index], right, self.m, self.shape_)


NORM_DTYPE = torch.float64
"""Ghost norms are certified in float64: :func:`inner` casts the factors to float64 (a few
samples at a time, :data:`GRAM_CHUNK`) before their Gram matrices are formed, so every Gram entry
is a float64 dot product of exactly represented float32 (bfloat16, float16) values, and the Gram
sums are float64 too (:func:`norm_sq_and_error32` forms float32 Grams instead and certifies
their rounding a posteriori).  A float32 Gram entry has an error of about ``gamma ||L_t|| ||L_s||``
(``gamma ~ width 2^-24``), and the norm, a difference of such terms for a sample whose tokens
cancel, an error of about ``gamma S_b^2`` (relative ``gamma (S_b / ||G_b||)^2``): too large to
clip by.  In float64 the same error is ``eta S_b^2`` with ``eta`` of :func:`ghost_error`, about
``(width + T^2) 2^-52``, and :mod:`dptrain.clipping` clips by the certified upper bound
``sqrt(n2 + eta S^2)``."""

GRAM_CHUNK = 2**22
"""Elements of the float64 copies (factors and Gram matrices) one ghost-norm pass may make: the
batch is taken a few samples at a time (at least one), so the float64 copy of a big factor (an LM
head's output gradient, ``B T V``) stays bounded."""

_U = 2.0**-53  # unit roundoff of float64


def _wide(t: Tensor) -> Tensor:
    """Index factors as they are (exact); values in float64 (exact: every float32, bfloat16 and
    float16 value is a float64 value)."""
    return t if is_index(t) else t.to(NORM_DTYPE)


def gram64(x: Tensor, y: Tensor) -> Tensor:
    """:func:`gram` in float64: index factors as one-hot rows (a bool mask, or the gathered
    values, exact), dense ones cast to float64 a slice of the width at a time, so that one
    sample's float64 copy of a wide factor (an LM head's ``T x V`` output gradient) is bounded
    by :data:`GRAM_CHUNK` elements too; the slices' products are summed in float64 (any order
    is covered by :func:`ghost_error`)."""
    if is_index(x) or is_index(y):
        out = gram(x, y)
        return out if out.dtype == torch.bool else out.to(NORM_DTYPE)
    return _gram_in(x, y, NORM_DTYPE)


def _gram_in(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """``x y^T`` per sample with both cast to ``dtype`` (exactly: a widening cast) a slice of the
    width at a time (:data:`GRAM_CHUNK` elements), the slices' products summed in ``dtype``; no
    copy at all for factors already in ``dtype``."""
    width = x.shape[-1]
    step = max(1, GRAM_CHUNK // max(x.shape[0] * (x.shape[1] + y.shape[1]), 1))
    if step >= width or (x.dtype == dtype and y.dtype == dtype):
        xw = x.to(dtype)
        return torch.bmm(xw, xw.transpose(1, 2) if y is x else y.to(dtype).transpose(1, 2))
    out: Tensor | None = None
    for i in range(0, width, step):
        xs = x[..., i : i + step].to(dtype)
        ys = xs if y is x else y[..., i : i + step].to(dtype)
        part = torch.bmm(xs, ys.transpose(1, 2))
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


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


def _width(t: Tensor | None) -> int:
    return 0 if t is None or is_index(t) else t.shape[-1]


def _by_rows(fn, factors: list[Outer]):  # type: ignore[no-untyped-def]
    """``fn(*factors)`` a few samples at a time, so that its float64 copies (the factors' and
    the Gram matrices') stay within :data:`GRAM_CHUNK` elements; results concatenated.  (A
    single sample's wide factor is cast a slice at a time by :func:`gram64`.)"""
    per = 2 * factors[0].length * factors[-1].length  # the two Gram matrices
    per += sum(_width(f.left) + _width(f.right) for f in factors if f.length == 1)  # cast whole
    rows, batch = max(1, GRAM_CHUNK // max(per, 1)), factors[0].batch
    if rows >= batch:
        return fn(*factors)
    parts = [fn(*[f.rows(slice(i, i + rows)) for f in factors]) for i in range(0, batch, rows)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(col) for col in zip(*parts, strict=True))
    return torch.cat(parts)


def inner(f: Outer, g: Outer) -> Tensor:
    """``<G_b, G'_b>`` for every sample, from factors only (float64, shape (B,)); every product
    and sum in float64 (error bound: :func:`ghost_error`)."""
    if f.right is None or g.right is None:
        if f.right is not None or g.right is not None or is_index(f.left) or is_index(g.left):
            raise ValueError("inner product of a vector and a matrix gradient")
        return (f.left.sum(1, dtype=NORM_DTYPE) * g.left.sum(1, dtype=NORM_DTYPE)).sum(1)
    return _by_rows(_inner, [f, g])


def _inner(f: Outer, g: Outer) -> Tensor:
    assert f.right is not None and g.right is not None
    if f.length == 1 and g.length == 1 and not (is_index(f.left) or is_index(g.left)):
        fl, gl, fr, gr = _wide(f.left), _wide(g.left), _wide(f.right), _wide(g.right)
        return (fl[:, 0] * gl[:, 0]).sum(1) * (fr[:, 0] * gr[:, 0]).sum(1)
    return _gram_dot(gram64(f.left, g.left), gram64(f.right, g.right))


def _gram_dot(left: Tensor, right: Tensor) -> Tensor:
    """``sum_{t,s} left_bts right_bts`` per sample in float64 (a bool ``left``: a mask).  The
    ghost norms pass float64 Gram matrices; others are cast (exactly) first."""
    if left.dtype == torch.bool:
        return torch.where(left, right, 0.0).to(NORM_DTYPE).sum((1, 2))
    return (left.to(NORM_DTYPE) * right.to(NORM_DTYPE)).sum((1, 2))


def bound(f: Outer) -> Tensor:
    """``S_b = sum_t ||L_bt|| ||R_bt||`` (float64, (B,)): ``||G_b|| <= S_b`` by the triangle
    inequality.  ``S_b / ||G_b||`` measures how much a sample's tokens cancel."""
    left = torch.ones(f.left.shape[:2], dtype=NORM_DTYPE, device=f.left.device)
    if not is_index(f.left):
        left = torch.linalg.vector_norm(f.left, dim=-1, dtype=NORM_DTYPE)
    if f.right is None:
        return left.sum(1)
    return (left * torch.linalg.vector_norm(f.right, dim=-1, dtype=NORM_DTYPE)).sum(1)


def _self_term(f: Outer) -> tuple[Tensor, Tensor]:
    """``(inner(f, f), bound(f))``, the bound's token norms read off the diagonals of the two
    float64 Gram matrices the inner product forms anyway (``||L_bt||^2 = (L L^T)_btt``): the
    same inner product, and no second pass over the factors (the largest, the LM head's output
    gradient, is ``B T V``).  The diagonal entries are float64 dot products (relative rounding
    ``width 2^-53``): the bound selects the samples that :mod:`dptrain.clipping` materializes,
    with a margin of 64, and scales the certified error ``eta S^2`` (:func:`ghost_error`, which
    allows for that rounding)."""
    if f.right is None or f.length == 1:
        return inner(f, f), bound(f)
    return _by_rows(_self_term_rows, [f])


def _self_term_rows(f: Outer) -> tuple[Tensor, Tensor]:
    assert f.right is not None
    left, right = gram64(f.left, f.left), gram64(f.right, f.right)

    def norms(g: Tensor) -> Tensor:
        if g.dtype == torch.bool:  # one-hot rows: norm 1
            return torch.ones(g.shape[:2], dtype=NORM_DTYPE, device=g.device)
        return g.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()

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


def ghost_error(factors: list[Outer], length: int | None = None) -> float:
    """``eta`` with ``|norm_sq(factors)_b - ||G_b||^2| <= eta S_b^2``, ``S_b = sum_i bound(G_i)_b``
    summed over all uses of the parameter (cross terms included), whatever the summation order
    of the float64 dot products and reductions (BLAS blocking, FMA).

    With ``u = 2^-53`` and ``gamma_k = k u / (1 - k u)`` (Higham, *Accuracy and Stability of
    Numerical Algorithms*, 3.1 and Lemma 3.3: a k-term float64 dot product errs by at most
    ``gamma_k`` times the sum of the absolute products, and ``(1 + gamma_j)(1 + gamma_k) <= 1 +
    gamma_{j+k}``), write ``l_t = ||L_t||``, ``r_t = ||R_t||`` for use ``f`` and primes for use
    ``g``.  The inputs are exact in float64 (casts of float32/bfloat16/float16 values; index
    factors give exact one-hot Gram entries, width 0), so a left Gram entry of width ``m`` is
    ``a_ts (1 + .) `` with ``|A_ts - a_ts| <= gamma_m l_t l'_s`` and ``|a_ts| <= l_t l'_s``
    (Cauchy-Schwarz), the right one likewise with ``n``.  Hence ``|A_ts B_ts - a_ts b_ts| <=
    ((1 + gamma_m)(1 + gamma_n) - 1) l_t l'_s r_t r'_s``; rounding the products and summing the
    ``T T'`` of them multiplies the sum of their absolute values, at most ``(1 + gamma_{m+n})
    S S'``, by ``1 + gamma_{T T'}``.  So ``|inner(f, g) - <G, G'>| <= gamma_{m + n + T T'} S
    S'``.  A vector parameter's ``sum_t L_t`` is summed in float64 (``||V - v|| <= gamma_T S``),
    then dotted: ``gamma_{m + T + T'} S S'``.  Summing the ``K = k (k + 1) / 2`` terms of ``k``
    uses (cross terms doubled, exactly) adds ``gamma_K (sum_i S_i)^2``.  With ``w`` the largest
    ``m + n + T T'`` over pairs, the error is at most ``gamma_{w + K} (sum_i S_i)^2 <= 2 u (w + K)
    (sum S_i)^2`` (``(w + K) u <= 1/2``); the factor 2 more returned covers the rounding of the
    computed ``S`` itself (float64 norms read off the Gram diagonals, relative ``gamma_{m+n}``).

    For a GPT-2 LM head (``m = 50257``, ``n = 768``, ``T = 1024``) ``eta ~ 4.9e-10`` (the
    ``T^2`` reduction dominates): a sample with ``S_b <= 64 ||G_b||`` (all others are
    materialized) has its clipping norm over-estimated by at most ``eta 64^2 / 2 ~ 1e-6``,
    relatively, and by ``eta T / 2 ~ 2.5e-7`` when its tokens add like random vectors
    (``S_b / ||G_b|| ~ sqrt(T)``); at ``T = 128``, ``eta ~ 3e-11``.

    ``length``: a bound on every use's length to state ``eta`` for instead of the uses' own
    (``eta`` grows with it, so it stays a bound), which makes it the same for every batch."""
    k = len(factors)
    worst = 0
    for i, f in enumerate(factors):
        for g in factors[: i + 1]:
            tf, tg = max(f.length, length or 0), max(g.length, length or 0)
            if f.right is None or g.right is None:
                w = f.m + tf + tg
            else:
                left = 0 if is_index(f.left) or is_index(g.left) else _width(f.left)
                right = 0 if is_index(f.right) or is_index(g.right) else _width(f.right)
                w = left + right + tf * tg
            worst = max(worst, w)
    return 4 * _U * (worst + k * (k + 1) // 2 + 2)


FLOAT32_SLACK = 2.0**-6
"""The largest certified relative error ``err / n2`` of a float32 ghost norm that the clip
accepts (its norm is then over-estimated by at most ``2^-7``, 0.8%: the sample is clipped at
most that much harder, never less); samples above it are recomputed in float64."""

FLOAT32_GRAM_COST = 2**22
"""Gram multiply-adds per sample (:func:`ghost_cost`) from which a parameter's ghost norms are
tried in float32: below it the float64 Grams cost little (a layer of width 256 over 128
tokens is at it) and keep the clip exact to ``1e-9``."""

_U32 = 2.0**-24  # unit roundoff of float32


def exact_float32_matmul(device: torch.device) -> bool:
    """Whether float32 ``bmm`` on ``device`` is IEEE float32 arithmetic (no TF32 or bfloat16
    passes, which :func:`norm_sq_and_error32`'s bound does not cover): CPU and CUDA with
    torch's float32 matmul precision at ``"highest"``/``"ieee"``."""
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
    except RuntimeError:  # legacy and new precision settings mixed: torch refuses to say
        return False
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    for setting in (backend, torch.backends):
        if getattr(setting, "fp32_precision", "none") not in ("none", "ieee"):
            return False
    return not (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)


_HALVES = (torch.float32, torch.bfloat16, torch.float16)  # exact in float32
_TINY = 2.0**-126  # the smallest normal float32: below it, flush-to-zero may lose a value


def float32_for_run(factors: list[Outer], max_length: int, always: bool) -> bool:
    """Whether one parameter's ghost norms take float32 Grams (:func:`norm_sq_and_error32`) in
    every batch of a run whose uses have at most ``max_length`` positions each.

    A function of public values only (the uses' count, widths and dtypes, ``max_length``, the
    ghost mode, the device's matmul setting), never of a batch's padded length: the float32
    path over-clips a sample by its own certified slack (up to :data:`FLOAT32_SLACK`), the
    float64 and materialized paths by ~1e-9, so a path chosen by the batch would let one added
    sample move the other samples' coefficients (``tests/engine/test_neighbours.py``).

    Float32 when the uses are matrices with float32/bfloat16/float16 (or index) factors of
    widths below ``2^20``, with at least :data:`FLOAT32_GRAM_COST` Gram multiply-adds per
    sample at length ``max_length``, on IEEE float32 matmuls, and (unless ``always``) ghosted
    by :func:`prefer_ghost` at *every* length up to ``max_length``.  That last holds when
    ``L c_u < 2 m n`` for every use ``u`` with ``c_u = (u + 1) d_u + sum_{i >= u} d_i`` (``d_i``
    the widths summed in :func:`ghost_cost`): from ``T_i T_j <= L (T_i + T_j) / 2``,
    ``ghost_cost <= (L / 2) sum_u c_u T_u < m n sum_u T_u``.  A use longer than ``max_length``
    raises: the bound would not hold."""
    for f in factors:
        if f.length > max_length:
            raise ValueError(
                f"a use of a parameter spans {f.length} positions, more than max_length = "
                f"{max_length}: pass the longest sequence any batch can have (the recipe's "
                "data.max_length), or max_length=None (float64 Grams throughout)"
            )
    if not factors[0].batch or any(f.right is None for f in factors):
        return False
    for f in factors:
        for t in (f.left, f.right):
            assert t is not None
            if not is_index(t) and (t.dtype not in _HALVES or t.shape[-1] >= 2**20):
                return False
    widths = [_dim(f.left) + _dim(f.right) for f in factors if f.right is not None]
    m, n = factors[0].matrix_shape
    if not always:
        for u, d in enumerate(widths):
            if max_length * ((u + 1) * d + sum(widths[u:])) >= 2 * m * n:
                return False
    return ghost_cost(factors, max_length) >= FLOAT32_GRAM_COST and exact_float32_matmul(
        factors[0].left.device
    )


def use_structure(factors: list[Outer]) -> tuple:
    """The public values of one parameter's uses that :func:`float32_for_run` decides on,
    less their lengths (bounded by ``max_length``) and the batch size: per use, each factor's
    kind (index, or dtype and width), the matrix shape; and the device.  The decision, and its
    proof (ghosted at every length up to the bound), hold for this structure only: the run
    keeps the structure of its first decision and refuses a batch with another where float32
    Grams are involved (:func:`dptrain.clipping.clip_and_sum`'s ``decided``).  A few attribute
    reads per use: compared per parameter per step at no measurable cost."""

    def kind(t: Tensor | None) -> tuple | None:
        if t is None:
            return None
        return ("index",) if is_index(t) else (t.dtype, t.shape[-1])

    return (
        factors[0].left.device if factors else None,
        tuple((kind(f.left), kind(f.right), f.m) for f in factors),
    )


_Rounding = tuple[float, float, float]  # (gamma, c1, c0) of a float32 Gram's entries


def _gram32(x: Tensor, y: Tensor) -> tuple[Tensor, _Rounding]:
    """``(gram, (gamma, c1, c0))``: :func:`gram` with dense factors in float32 (cast exactly, a
    slice at a time), whose entries err by at most

        |gram_ts - x_t . y_s| <= gamma ||x_t|| ||y_s|| + c1 (||x_t|| + ||y_s||) + c0

    for any summation order: ``gamma = gamma_w`` of the width ``w`` (Higham 3.1) for the
    rounding of normal numbers; ``c1 = sqrt(w) 2^-126`` for operands flushed to zero (a lost
    ``x_ti y_si`` is below ``2^-126 |y_si|``, and ``sum_i |y_si| <= sqrt(w) ||y_s||``);
    ``c0 = (2 w + 1) 2^-126`` for flushed products, sums and the Gram's own cast; the last two
    amplified by the later roundings, ``1 + 2 gamma``.  Index factors give exact entries: all 0."""
    if is_index(x) or is_index(y):
        return gram(x, y), (0.0, 0.0, 0.0)
    w = x.shape[-1]
    gamma = w * _U32 / (1 - w * _U32)
    grow = 1 + 2 * gamma
    return _gram_in(x, y, torch.float32), (gamma, grow * w**0.5 * _TINY, grow * (2 * w + 1) * _TINY)


def _token_norms(g: Tensor, rounding: _Rounding) -> Tensor:
    """Upper bounds on the token norms ``l_t = ||x_t||`` from a float32 self Gram's diagonal, in
    float64: ``G_tt >= (1 - gamma) l^2 - 2 c1 l - c0`` gives ``l <= (c1 + sqrt(c1^2 + (1 - gamma)
    (G_tt + c0))) / (1 - gamma)``, lifted over its own rounding; one-hot rows (a bool Gram) have
    norm 1."""
    if g.dtype == torch.bool:
        return torch.ones(g.shape[:2], dtype=NORM_DTYPE, device=g.device)
    gamma, c1, c0 = rounding
    diag = g.diagonal(dim1=1, dim2=2).to(NORM_DTYPE).clamp(min=0)
    return (c1 + (c1 * c1 + (1 - gamma) * (diag + c0)).sqrt()) / (1 - gamma) * (1 + 16 * _U)


def _entry_error(rounding: _Rounding, u: Tensor, v: Tensor) -> Tensor | float:
    """:func:`_gram32`'s bound on every entry's error, ``(B, T, T')`` in float64 (0: exact)."""
    gamma, c1, c0 = rounding
    if not gamma:
        return 0.0
    return gamma * u.unsqueeze(2) * v.unsqueeze(1) + c1 * (u.unsqueeze(2) + v.unsqueeze(1)) + c0


def _pair32(
    f: Outer, g: Outer, norms: dict[int, tuple[Tensor, Tensor]], length: int
) -> tuple[Tensor, Tensor]:
    """``(inner, err)`` of uses ``f`` and ``g`` from float32 Grams ``A ~ a = L L'^T`` and ``B ~
    b = R R'^T``, multiplied and summed in float64 (products of float32 values are exact
    there).  With entry errors ``|A - a| <= E_A``, ``|B - b| <= E_B`` (:func:`_entry_error`, from
    the token-norm bounds ``l, r`` of ``f`` and ``l', r'`` of ``g``), ``|AB - ab| <= E_A |B| + |A|
    E_B + E_A E_B`` entrywise (as ``|a| <= |A| + E_A``): ``err`` is its sum, ``~ gamma_m l^T |B|
    l' + gamma_n r^T |A| r'`` (the float64 sum's own rounding is :func:`ghost_error`'s)."""
    assert f.right is not None and g.right is not None
    a, ra = _gram32(f.left, f.left if f is g else g.left)
    b, rb = _gram32(f.right, f.right if f is g else g.right)
    if f is g:
        norms[id(f)] = (_token_norms(a, ra), _token_norms(b, rb))
    (lf, rf), (lg, rg) = norms[id(f)], norms[id(g)]
    value = _gram_dot(a, b)
    ea, eb = _entry_error(ra, lf, lg), _entry_error(rb, rf, rg)  # in place below: 3 temporaries
    err = (b.to(NORM_DTYPE).abs_().add_(eb).mul_(ea)).sum((1, 2))
    err = err + a.to(NORM_DTYPE).abs_().mul_(eb).sum((1, 2))
    # the bound's own float64 evaluation: (T T' + 8) roundings of non-negative terms at most
    pairs = max(length * length, f.length * g.length)  # stated at the public bound
    return value, err * (1 + 4 * (pairs + 8) * _U)


def _norm32_rows(*factors: Outer, length: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`norm_sq_and_error32` for a few samples: each use's self term (which gives its
    token norms), then its cross terms with the uses before it (doubled, exactly)."""
    norms: dict[int, tuple[Tensor, Tensor]] = {}
    total, err = _pair32(factors[0], factors[0], norms, length)
    for i, f in enumerate(factors):
        if i:
            v, e = _pair32(f, f, norms, length)
            total, err = total + v, err + e
        for g in factors[:i]:
            v, e = _pair32(f, g, norms, length)
            total, err = total + 2 * v, err + 2 * e
    s = sum((norms[id(f)][0] * norms[id(f)][1]).sum(1) for f in factors)
    return total, err, s


def norm_sq_and_error32(
    factors: list[Outer], length: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(n2, err, S)`` of one parameter's uses from float32 Gram matrices: ``|n2_b - ||G_b||^2|
    <= err_b`` (certified, every summation order: :func:`_pair32` for each pair of uses plus
    :func:`ghost_error`'s ``eta S^2`` for the float64 sums) and ``S_b >= sum_i bound(G_i)_b``.
    Twice as fast as the float64 Grams on a CPU, 32-64 times on GPUs with slow float64; the
    price is ``err``, ``(gamma_m + gamma_n) 2^-24``-sized terms weighted by the Grams: 2e-4 to
    2e-2 of ``n2`` for transformer block linears of width 256 to 3072
    (:data:`FLOAT32_SLACK` decides).  Used where :func:`float32_for_run`.  ``length``: the
    public bound the length-dependent terms are stated at (the uses' own lengths if None), so
    that a sample's ``err`` does not follow its batch's padded length beyond rounding."""
    rows = functools.partial(_norm32_rows, length=length or 0)
    n2, err, s = _by_rows(rows, factors)
    err = err + ghost_error(factors, length) * s * s
    return n2, torch.nextafter(err, torch.full_like(err, float("inf"))), s


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


def ghost_cost(factors: list[Outer], length: int | None = None) -> int:
    """Multiply-adds per sample of :func:`norm_sq` (Gram matrices of left and right factors);
    with ``length``, as if every use had that many positions."""
    cost = 0
    for i, f in enumerate(factors):
        for g in factors[: i + 1]:
            per_pair = _dim(f.left) + (0 if f.right is None else _dim(f.right))
            pairs = f.length * g.length if length is None else length * length
            cost += pairs * per_pair
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
