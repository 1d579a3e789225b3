"""Per-sample clipping by group and the clipped sum, from one chunk's recorded uses.

For groups ``g`` with thresholds ``C_g``, sample ``b`` contributes ``c_gb * grad_b[p]`` to every
parameter ``p`` of group ``g``, where ``c_gb = min(1, C_g / (||grad_b restricted to g|| + 1e-6))``.
The clipped group sum thus has L2 sensitivity ``C_g`` under adding or removing one sample.

A parameter's per-sample gradient is the sum of its parts (:class:`~.grad_sample.Recorded`):
fused uses, module calls re-run per sample, and Jacobian rows for direct uses.  Its per-sample
norm comes either from ghost norms of the factorized parts (with the cross terms between every
pair of uses, so tied embeddings stay exact) or from materialized per-sample gradients,
whichever :func:`~dptrain.grad_sample.outer.prefer_ghost` finds cheaper (``ghost="auto"``).
Ghosted parameters get their clipped sum as one contraction ``L^T diag(c) R`` (book-keeping: no
second backward pass).  A sample whose gradient is not finite contributes nothing.

Numerical bound.  Every norm clipped by is a certified upper bound on the exact norm of the
factors' gradient.  With float32 Gram entries the error of a squared ghost norm is up to
``gamma S_b^2`` (``S_b = sum_t ||L_bt|| ||R_bt||`` bounds ``||G_b||``, ``gamma ~ width 2^-24``):
relatively ``gamma r^2`` with ``r = S_b / ||G_b||``, so a sample whose tokens partly cancel got a
norm too small and a contribution above the clip (crafted: ``C (1 + 1.2e-3)``).  So the norms
come from one of two certified computations (:func:`_ghost_norms`):

* float64 Grams (factors cast a few samples at a time): error at most ``eta S^2``, ``eta`` of
  :func:`~.grad_sample.outer.ghost_error` (about ``(width + T^2) 2^-52``); the norm is
  ``sqrt(n2 + eta S^2)`` and over-clips by a relative ``eta r^2 / 2``, below ``1e-6`` even for a
  GPT-2 LM head over 1024 tokens at ``r = 64``;
* float32 Grams with their a-posteriori error ``err`` (:func:`~.grad_sample.outer.
  norm_sq_and_error32`: the rounding weighted by the other Gram, not ``gamma S^2``); the norm
  is ``sqrt(n2 + err)``, accepted where ``err <=`` :data:`~.grad_sample.outer.FLOAT32_SLACK`
  ``n2`` (an over-clip of at most ``2^-7``, 0.8%; 0.01-0.5% on the layers of the
  benchmarks' 4-layer GPT-2), the other samples redone in float64.  Only with a public bound ``max_length`` on
  every use's length (the recipe path passes ``data.max_length``), and only for the parameters
  :func:`~.grad_sample.outer.float32_for_run` picks from public values: wide enough to pay,
  and ghosted at every length up to the bound, for the use structure of the parameter's first
  batch (a later batch with another structure is refused: ``clip_and_sum``'s ``decided``).
  The path of a sample is thus fixed for the run
  but for its own loose or cancelling norms, never chosen by the other samples of the batch:
  the float32 path's over-clip is per sample (up to 0.8%), so a path that followed the padded
  length would let one added long sequence move every other sample's coefficient.

A materialized gradient's norm is its float64 norm plus that reduction's error bound
(:func:`_sq_up`); group sums and square roots are rounded up.  The coefficient ``min(1, C / (N +
1e-6))`` is computed in float64 and rounded toward zero into the dtype it multiplies in
(:func:`clip_coef`, shared with DiceSGD's C2 clip and the federated server clip), so ``coef * N
<= C`` exactly.

The book-keeping contraction ``L^T diag(c) R`` is still a float32 sum (for float32 and
half-precision factors): its rounding is at most ``gamma_{BT} sum_b c_b S_b`` in all (the
worst case over every summation order; float32 ``gamma``).  So a sample with ``S_b > 64 ||G_b||`` is materialized and
clipped by the norm of the very tensor that is added; for the others that rounding is at most
``64 gamma_T`` relatively in the worst case, and about ``2^-24 r / width`` in practice (random
signs), as for any float32 sum of clipped gradients (the tests see ``C (1 + 3e-8)`` at most on
crafted samples of ratio 4 to 200, widths 64 to 8192, float32 and bfloat16 factors).  A
sample's clipped contribution thus exceeds ``C_g`` only by the rounding of float32 sums, never by
an error in its norm.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .grad_sample import Outer, Recorded, Use
from .grad_sample.outer import (
    FLOAT32_SLACK,
    NORM_DTYPE,
    float32_for_run,
    ghost_error,
    norm_sq_and_bound,
    norm_sq_and_error32,
    prefer_ghost,
    use_structure,
)
from .segments import Segments, group_outer, group_rows

GhostMode = Literal["auto", "always", "never"]
Float32Decisions = dict[nn.Parameter, list]
"""A run's float32 Gram decisions (:func:`clip_and_sum`'s ``decided``, kept by the caller from
step to step): per parameter, ``[structure, chosen]``: the :func:`~.grad_sample.outer.
use_structure` of its uses in the first batch that showed it, and whether float32 Grams were
ever taken for it."""
CANCELLATION = 64.0  # S_b / ||G_b|| above which a ghosted sample is materialized


@dataclass
class ClippedSums:
    """The result of clipping one (physical) batch."""

    sums: dict[nn.Parameter, Tensor]  # sum_b c_{g(p) b} grad_b[p]
    norms: dict[str, Tensor]  # per group, per sample: ||grad_b|_g|| before clipping
    nonfinite: int  # samples dropped for a non-finite gradient
    raw: dict[nn.Parameter, Tensor] | None = None  # sum_b grad_b[p] over finite samples
    ghosted: int = 0  # parameters whose norms were ghost norms
    refined: int = 0  # (parameter, sample) ghost norms redone in float64 (float32 bound too loose)


def ghost_mode(ghost: bool | str) -> GhostMode:
    """``True``/``"auto"``: choose per parameter by cost; ``"always"``: ghost every factorized
    parameter; ``False``/``"never"``: materialize every per-sample gradient."""
    mode = {True: "auto", False: "never"}.get(ghost, ghost)  # type: ignore[call-overload]
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"ghost must be True, False, 'auto', 'always' or 'never', got {ghost!r}")
    return mode


def _mask(keep: Tensor, t: Tensor) -> Tensor:
    return torch.where(keep.view((-1,) + (1,) * (t.dim() - 1)), t, 0.0)


def _factors(use: Use) -> dict[str, Outer] | None:
    if "outer" not in use.cache:
        use.cache["outer"] = use.rule.outer(use)
    return use.cache["outer"]


def _dense(t: Tensor) -> Tensor:
    """A sparse gradient (``Embedding(sparse=True)`` differentiated by autograd) as dense."""
    return t.to_dense() if t.is_sparse else t


def _per_sample(use: Use) -> dict[str, Tensor]:
    if "per_sample" not in use.cache:
        use.cache["per_sample"] = {r: _dense(g) for r, g in use.rule.per_sample(use).items()}
    return use.cache["per_sample"]


NORM_CHUNK = 2**22  # elements of a float64 copy that one per-sample norm reduction may make


def _sq(t: Tensor, chunk: int | None = None) -> Tensor:
    """``||t_b||^2`` per sample, reduced in float64 a few rows at a time: the float64 copy the
    reduction makes of a materialized per-sample gradient is bounded by ``chunk`` elements
    instead of doubling (float32) or quadrupling (bf16) the gradient's own memory.  Each row is
    reduced alone either way (the values equal the one-call reduction's on the CPU)."""
    flat = t.reshape(t.shape[0], -1)  # a scalar parameter's rows are (B,)
    rows = max(1, (NORM_CHUNK if chunk is None else chunk) // max(flat.shape[1], 1))
    if rows >= flat.shape[0] or flat.dtype == NORM_DTYPE:
        return torch.linalg.vector_norm(flat, dim=1, dtype=NORM_DTYPE).pow(2)
    return torch.cat(
        [
            torch.linalg.vector_norm(part, dim=1, dtype=NORM_DTYPE).pow(2)
            for part in flat.split(rows)
        ]
    )


def _up(t: Tensor) -> Tensor:
    """The next float64 value above ``t`` (``t`` a round-to-nearest result: the exact value
    lies within half a unit of it, so below this one)."""
    return torch.nextafter(t, torch.full_like(t, float("inf")))


def _sq_up(t: Tensor) -> Tensor:
    """An upper bound on ``||t_b||^2`` (the exact square norm of the very tensor that is
    added): :func:`_sq`'s float64 reduction of ``k`` squares errs by at most ``gamma_{k+2}``
    relatively (Higham 3.1; the norm squared back adds two roundings)."""
    k = t[0].numel() if t.dim() else 1
    return _up(_sq(t) * (1 + 4 * (k + 3) * 2.0**-53))


def norm_bound(tensors: Iterable[Tensor]) -> Tensor:
    """A float64 upper bound (0-dim) on the L2 norm of ``tensors`` taken together: squares
    summed in float64, the reduction's error (``gamma_{k+2}`` relatively for ``k`` entries in
    all) added, the square root rounded up.  With :func:`clip_coef`, a whole-vector clip (DiceSGD's
    C2, the federated server's C) that cannot exceed its threshold."""
    total, k = None, 0
    for t in tensors:
        v = torch.linalg.vector_norm(t, dtype=NORM_DTYPE).pow(2)
        total = v if total is None else total + v
        k += t.numel() + 3
    if total is None:
        return torch.zeros((), dtype=NORM_DTYPE, device="cpu")
    return _up(_up(total * (1 + 4 * (k + 1) * 2.0**-53)).sqrt())


def clip_coef(
    norm: Tensor | float, clip: float | Tensor, dtype: torch.dtype, *, eps: float = 1e-6
) -> Tensor:
    """``min(1, clip / (norm + eps))`` as a value of ``dtype`` that never exceeds it: computed
    in float64, stepped three float64 units down (the sum and the quotient each round by at
    most one unit, relatively ``2^-53``), then rounded toward zero into ``dtype`` (the dtype it
    multiplies in, so the multiply's own cast cannot round it up).  With ``norm`` an upper
    bound on the norm, ``coef * norm <= clip``.  A non-finite ``norm`` gives 0 (the sample
    contributes nothing: ``min(1, C / nan)`` would let it in unclipped).  Shared by the
    per-sample clip, DiceSGD's C2 clip and the federated server clip."""
    if isinstance(norm, Tensor):  # (as_tensor would move it to a default device)
        norm = norm.to(NORM_DTYPE)
    else:
        norm = torch.tensor(norm, dtype=NORM_DTYPE, device="cpu")
    if isinstance(clip, Tensor):
        clip = clip.to(device=norm.device, dtype=NORM_DTYPE)
    k = clip / (norm + eps)
    zero = torch.zeros_like(k)
    for _ in range(3):
        k = torch.nextafter(k, zero)
    k = torch.where(torch.isfinite(norm), k.nan_to_num(nan=0.0).clamp(max=1.0), zero)  # 0/0: C = 0
    out = k.to(dtype)
    if dtype == NORM_DTYPE:
        return out
    return torch.where(out.to(NORM_DTYPE) > k, torch.nextafter(out, torch.zeros_like(out)), out)


def _certified64(factors: list[Outer]) -> tuple[Tensor, Tensor]:
    """``(upper, heavy)``: the certified upper bound ``n2 + eta S^2`` on every sample's squared
    ghost norm from float64 Grams, and the samples whose tokens cancel beyond
    :data:`CANCELLATION` (to be materialized)."""
    n2, s = norm_sq_and_bound(factors)
    n2 = n2.clamp(min=0)
    return _up(n2 + _up(ghost_error(factors) * s * s)), s > CANCELLATION * n2.sqrt()


def _certified32(factors: list[Outer], length: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(upper, heavy, loose)`` from float32 Grams (:func:`norm_sq_and_error32`): ``upper =
    n2 + err``; ``loose``: samples whose certified error is above ``FLOAT32_SLACK n2`` or not
    finite (a float32 Gram may overflow where a float64 one does not)."""
    n2, err, s = norm_sq_and_error32(factors, length)
    n2 = n2.clamp(min=0)
    loose = ~(torch.isfinite(n2) & torch.isfinite(err) & (err <= FLOAT32_SLACK * n2))
    return _up(n2 + err), torch.isfinite(s) & (s > CANCELLATION * n2.sqrt()), loose


class UseStructureChanged(ValueError):
    """A batch's use structure of a parameter differs from the one its float32 decision was
    made on (:func:`clip_and_sum`'s ``decided``)."""


def _describe(structure: tuple | None) -> str:
    """A :func:`~.grad_sample.outer.use_structure` in words."""
    if structure is None:
        return "per-sample gradients (no factors)"

    def kind(k: tuple | None) -> str:
        return "-" if k is None else "index" if k == ("index",) else f"{k[0]} width {k[1]}"

    uses = structure[1]
    each = "; ".join(f"{kind(a)} x {kind(b)}" for a, b, _ in uses)
    return f"{len(uses)} use{'s' if len(uses) != 1 else ''} ({each})"


def _changed(name: str, first: tuple | None, now: tuple | None) -> UseStructureChanged:
    return UseStructureChanged(
        f"parameter {name}: this batch has {_describe(now)}, the run's first batch "
        f"{_describe(first)}, and its ghost norms take float32 Grams, decided once per run for one use structure: their "
        "proof (the parameter ghosted at every length up to max_length, so no batch moves a "
        "sample's path) holds for that structure only. Fix: keep the model's uses of a "
        "parameter the same in every step (e.g. apply a layer a fixed number of times), or "
        "pass max_length=None (float64 Grams throughout)"
    )


def _same_structure(
    decided: Float32Decisions, p: nn.Parameter, fs: list[Outer] | None, name: str
) -> bool:
    """Whether ``p``'s use structure in this batch (``fs`` None: not factorized) is the one
    first recorded for it (recorded here at its first batch); another raises if float32
    Grams were taken for ``p`` before, whichever path this batch would take."""
    now = None if fs is None else use_structure(fs)
    first = decided.setdefault(p, [now, False])
    if now == first[0]:
        return True
    if first[1]:
        raise _changed(name, first[0], now)
    return False


def _ghost_norms(
    params: dict[nn.Parameter, list[Outer]],
    max_length: int | None,
    always: bool,
    decided: Float32Decisions | None = None,
    changed: dict[nn.Parameter, str] | None = None,
) -> tuple[dict[nn.Parameter, Tensor], dict[nn.Parameter, Tensor], int]:
    """Per ghosted parameter, a certified upper bound on every sample's squared norm and the
    samples whose tokens cancel beyond :data:`CANCELLATION` (to be materialized); and how many
    (parameter, sample) norms were redone in float64.

    Float32 Grams and their certified error (:func:`_certified32`) for the parameters
    :func:`float32_for_run` picks (never without a public ``max_length``), float64 Grams
    (:func:`_certified64`) for the others; a float32 sample whose bound is looser than
    :data:`FLOAT32_SLACK` is redone in float64.  So a sample's path depends on public values
    and on that sample alone, never on the other samples of its batch.  One read of the loose
    flags for all parameters together, not one per parameter.  ``decided``: the run's
    decisions (float32 taken is recorded); ``changed``: the parameters (by name) whose use
    structure differs from the one first recorded for them, for which float32 Grams raise
    :class:`UseStructureChanged`."""
    upper: dict[nn.Parameter, Tensor] = {}
    heavy: dict[nn.Parameter, Tensor] = {}
    loose: dict[nn.Parameter, Tensor] = {}
    for p, fs in params.items():
        if max_length is not None and float32_for_run(fs, max_length, always):
            if changed and p in changed:
                assert decided is not None
                raise _changed(changed[p], decided[p][0], use_structure(fs))
            if decided is not None:
                decided[p][1] = True
            upper[p], heavy[p], loose[p] = _certified32(fs, max_length)
        else:
            upper[p], heavy[p] = _certified64(fs)
    refined = 0
    flags = torch.stack([m.any() for m in loose.values()]).tolist() if loose else []
    for (p, mask), any_loose in zip(loose.items(), flags, strict=True):
        if any_loose:
            index = mask.nonzero().flatten()
            redone, heavy_redone = _certified64([f.select(index) for f in params[p]])
            upper[p] = upper[p].index_copy(0, index, redone)
            heavy[p] = heavy[p].index_copy(0, index, heavy_redone)
            refined += len(index)
    return {p: upper[p] for p in params}, {p: heavy[p] for p in params}, refined


def _acc(factors: list[Outer]) -> torch.dtype:
    """The dtype the book-keeping sum of these factors multiplies its coefficients in."""
    return functools.reduce(torch.promote_types, [f.accumulation_dtype for f in factors])


@torch.no_grad()
def clip_and_sum(
    recorded: Recorded,
    group_of: dict[nn.Parameter, str],
    clip: dict[str, float],
    *,
    ghost: bool | str = "auto",
    raw: bool = False,
    segments: Segments | None = None,
    max_length: int | None = None,
    decided: Float32Decisions | None = None,
    names: dict[nn.Parameter, str] | None = None,
) -> ClippedSums:
    """Clip every sample's gradient per group at ``clip[group]`` and sum over samples.

    With ``segments`` (:mod:`dptrain.segments`) a sample is a segment (a person): the rows of
    one segment are summed before the clip, ghost norms taking the Gram matrix over all of the
    segment's tokens; ``norms`` and ``nonfinite`` then count segments.  ``max_length``: a public
    bound on every use's length, which lets wide parameters take float32 Grams
    (:func:`_ghost_norms`; not with segments, whose lengths it does not bound).

    ``decided`` (:data:`Float32Decisions`, the caller's, kept across the run's steps and
    chunks; :class:`~dptrain.engine.PrivacyEngine` keeps one): the float32 decision is made
    from a parameter's use structure, and its proof holds for that structure only, so the
    structure of each parameter's first batch is recorded and a batch with another raises
    :class:`UseStructureChanged` where float32 Grams were or would be taken for it (a refusal,
    not a fallback: which path a sample takes must not follow the batch).  ``names``: the
    parameters' names for that message.  Without ``decided`` each call decides alone."""
    mode = ghost_mode(ghost)
    batch = recorded.batch_size if segments is None else segments.count
    per_row = (lambda t: t) if segments is None else (lambda t: group_rows(t, segments))
    parts: dict[nn.Parameter, list[tuple[Use, str]]] = defaultdict(list)
    for use in recorded.uses:
        for role, p in use.params.items():
            parts[p].append((use, role))
    for p in recorded.direct:
        parts.setdefault(p, [])

    sq: dict[str, Tensor] = {}
    materialized: dict[nn.Parameter, Tensor] = {}
    heavy_grads: dict[nn.Parameter, tuple[Tensor, Tensor]] = {}  # index, (k, *shape)

    def add_sq(group: str, value: Tensor) -> None:  # upper bounds stay upper bounds
        sq[group] = _up(sq[group] + value) if group in sq else value

    public_length = max_length if segments is None else None  # a person's rows: not bounded
    guard = decided if public_length is not None else None  # float32 only with a bound
    changed: dict[nn.Parameter, str] = {}  # use structure not the first batch's: no float32
    ghost_fs: dict[nn.Parameter, list[Outer]] = {}
    for p, items in parts.items():
        fs = [(_factors(u) or {}).get(role) for u, role in items]
        if segments is not None:
            fs = [None if f is None else group_outer(f, segments) for f in fs]
        factorized = items and all(f is not None for f in fs) and p not in recorded.direct
        # (a parameter with no use here, only given per-sample gradients -- the engine's
        # injected samples -- is materialized exactly whatever its uses: nothing to compare)
        if guard is not None and items:
            name = (names or {}).get(p, f"of shape {tuple(p.shape)}")
            if not _same_structure(guard, p, fs if factorized else None, name):
                changed[p] = name
        if factorized and mode != "never" and (mode == "always" or prefer_ghost(fs)):
            ghost_fs[p] = fs
            continue
        total = recorded.direct.get(p)
        total = None if total is None else per_row(_dense(total))
        owned = False  # total is a tensor made here (not cached, not the caller's): add in place
        for (u, role), f in zip(items, fs, strict=True):
            g = f.materialize() if f is not None else per_row(_per_sample(u)[role])
            if total is None:
                total, owned = g, f is not None
            elif owned and total.shape == g.shape and torch.result_type(total, g) == total.dtype:
                total.add_(g)  # the same sum as total + g, without a third (B, *shape) tensor
            else:
                total, owned = total + g, True
        materialized[p] = total

    ghost_sq, heavies, refined = _ghost_norms(
        ghost_fs, public_length, mode == "always", guard, changed
    )
    ghosted = {p: (fs, heavies[p]) for p, fs in ghost_fs.items()}

    # which ghosted parameters have heavy samples: one read of all the flags (one host-device
    # sync per chunk, not one per parameter); then their exact norms, and the squared norms
    # summed per group in the parameters' order as before
    flagged = torch.stack([h.any() for _, h in ghosted.values()]).tolist() if ghosted else []
    heavy_of = dict(zip(ghosted, flagged, strict=True))
    for p in parts:
        if p in materialized:
            add_sq(group_of[p], _sq_up(materialized[p]))
            continue
        n2 = ghost_sq[p]
        if heavy_of[p]:
            fs, heavy = ghosted[p]
            index = heavy.nonzero().flatten()
            g = sum(f.select(index).materialize() for f in fs)
            heavy_grads[p] = (index, g)
            n2 = n2.index_copy(0, index, _sq_up(g))
        add_sq(group_of[p], n2)

    device = next(iter(group_of)).device if group_of else torch.device("cpu")
    zero = torch.zeros(batch, device=device, dtype=NORM_DTYPE)
    norms = {g: _up(sq[g].sqrt()) if g in sq else zero for g in clip}
    finite = torch.ones(batch, dtype=torch.bool, device=device)
    for nrm in norms.values():
        finite &= torch.isfinite(nrm)
    nonfinite = int((~finite).sum())
    nan = torch.tensor(float("nan"), dtype=NORM_DTYPE, device=device)
    coefs: dict[tuple[str, torch.dtype], Tensor] = {}

    def coef(group: str, dtype: torch.dtype) -> Tensor:
        """The group's coefficients rounded toward zero into the dtype they multiply in; 0 for
        a sample with a non-finite norm in any group."""
        if (group, dtype) not in coefs:
            coefs[group, dtype] = clip_coef(
                torch.where(finite, norms[group], nan), clip[group], dtype
            )
        return coefs[group, dtype]

    if nonfinite:  # zero the offending samples so that 0 * nan does not poison the sums
        ghosted = {p: ([f.keep(finite) for f in fs], h) for p, (fs, h) in ghosted.items()}
        materialized = {p: _mask(finite, g) for p, g in materialized.items()}
        heavy_grads = {p: (i, _mask(finite[i], g)) for p, (i, g) in heavy_grads.items()}

    sums: dict[nn.Parameter, Tensor] = {}
    raws: dict[nn.Parameter, Tensor] | None = {} if raw else None
    ones = finite.to(torch.float32)
    for p, (fs, heavy) in ghosted.items():
        c = coef(group_of[p], _acc(fs))
        light = torch.where(heavy, torch.zeros_like(c), c)
        sums[p] = sum_over(fs, light)
        if p in heavy_grads:
            index, g = heavy_grads[p]
            sums[p] = sums[p] + torch.einsum("b,b...->...", coef(group_of[p], g.dtype)[index], g)
        if raws is not None:
            raws[p] = sum_over(fs, ones)
    for p, gs in materialized.items():
        acc = torch.promote_types(gs.dtype, torch.float32)  # half-precision rows: sum in fp32
        sums[p] = torch.einsum("b,b...->...", coef(group_of[p], acc), gs.to(acc))
        if raws is not None:
            raws[p] = gs.to(acc).sum(0)
    return ClippedSums(
        sums=sums,
        norms=norms,
        nonfinite=nonfinite,
        raw=raws,
        ghosted=len(ghosted),
        refined=refined,
    )


def sum_over(factors: list[Outer], coef: Tensor) -> Tensor:
    total = factors[0].weighted_sum(coef)
    for f in factors[1:]:
        total = total + f.weighted_sum(coef)
    return total
