"""Per-sample clipping by group and the clipped sum, from the recorded layer uses.

For groups ``G`` with thresholds ``C_g``, sample ``b`` contributes
``c_gb * grad_b[p]`` to every parameter ``p`` of group ``g``, where
``c_gb = min(1, C_g / (||grad_b restricted to g|| + 1e-6))``.  The clipped group sum thus has
L2 sensitivity ``C_g`` under adding or removing one sample.

Each parameter's per-sample norm comes either from ghost norms of its factorized gradients
(with the cross terms between every pair of its uses, so tied embeddings stay exact) or from
materialized per-sample gradients, whichever :func:`~dptrain.grad_sample.outer.prefer_ghost`
finds cheaper (``ghost="auto"``).  Ghosted parameters get their clipped sum as one contraction
``L^T diag(c) R`` (book-keeping: no second backward pass).  A sample whose gradient is not
finite contributes nothing (coefficient 0), which keeps the sensitivity bound.

``raw=True`` also returns ``sum_b grad_b[p]`` over the finite samples (unclipped), for policies
that read raw sums (error feedback): the fused layers never fill ``p.grad``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .grad_sample import GradCapture, Outer, Use
from .grad_sample.outer import norm_sq, prefer_ghost

GhostMode = Literal["auto", "always", "never"]


@dataclass
class ClippedSums:
    """The result of clipping one (physical) batch."""

    sums: dict[nn.Parameter, Tensor]  # sum_b c_{g(p) b} grad_b[p]
    norms: dict[str, Tensor]  # per group, per sample: ||grad_b|_g|| before clipping
    nonfinite: int  # samples dropped for a non-finite gradient
    raw: dict[nn.Parameter, Tensor] | None = None  # sum_b grad_b[p] over finite samples
    ghosted: int = 0  # parameters whose norms were ghost norms


def ghost_mode(ghost: bool | str) -> GhostMode:
    """``True``/``"auto"``: choose per parameter by cost; ``"always"``: ghost every factorized
    parameter; ``False``/``"never"``: materialize every per-sample gradient."""
    mode = {True: "auto", False: "never"}.get(ghost, ghost)  # type: ignore[call-overload]
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"ghost must be True, False, 'auto', 'always' or 'never', got {ghost!r}")
    return mode


def _batch_size(uses: list[Use]) -> int:
    return uses[0].grad.shape[0] if uses else 0


def _mask(keep: Tensor, t: Tensor) -> Tensor:
    return torch.where(keep.view((-1,) + (1,) * (t.dim() - 1)), t, 0.0)


@torch.no_grad()
def clip_and_sum(
    capture: GradCapture,
    uses: list[Use],
    group_of: dict[nn.Parameter, str],
    clip: dict[str, float],
    *,
    ghost: bool | str = "auto",
    raw: bool = False,
) -> ClippedSums:
    """Clip every sample's gradient per group at ``clip[group]`` and sum over samples."""
    mode = ghost_mode(ghost)
    batch = _batch_size(uses)
    parts: dict[nn.Parameter, list[tuple[Use, str]]] = defaultdict(list)
    for use in uses:
        for local, p in use.params.items():
            parts[p].append((use, local))

    def factors(use: Use) -> dict[str, Outer] | None:
        if "outer" not in use.cache:
            use.cache["outer"] = capture.rule(use.module).outer(use)
        return use.cache["outer"]

    def per_sample(use: Use) -> dict[str, Tensor]:
        if "per_sample" not in use.cache:
            use.cache["per_sample"] = capture.rule(use.module).per_sample(use)
        return use.cache["per_sample"]

    sq: dict[str, Tensor] = {}
    ghosted: dict[nn.Parameter, list[Outer]] = {}
    materialized: dict[nn.Parameter, Tensor] = {}

    def add_sq(group: str, value: Tensor) -> None:
        sq[group] = sq[group] + value if group in sq else value

    for p, items in parts.items():
        fs = [(factors(u) or {}).get(local) for u, local in items]
        if (
            mode != "never"
            and all(f is not None for f in fs)
            and (mode == "always" or prefer_ghost(fs))
        ):
            add_sq(group_of[p], norm_sq(fs))
            ghosted[p] = fs
            continue
        total = None
        for (u, local), f in zip(items, fs, strict=True):
            g = f.materialize() if f is not None else per_sample(u)[local]
            total = g if total is None else total + g
        materialized[p] = total
        add_sq(group_of[p], total.flatten(1).to(torch.float32).pow(2).sum(1))

    device = next(iter(group_of)).device if group_of else torch.device("cpu")
    zero = torch.zeros(batch, device=device)
    norms = {g: sq[g].sqrt() if g in sq else zero for g in clip}
    finite = torch.ones(batch, dtype=torch.bool, device=device)
    for n in norms.values():
        finite &= torch.isfinite(n)
    nonfinite = int((~finite).sum())
    coef = {}
    for g, c in clip.items():
        k = (
            torch.ones_like(norms[g])
            if c == float("inf")
            else (c / (norms[g] + 1e-6)).clamp(max=1.0)
        )
        coef[g] = torch.where(finite, k, torch.zeros_like(k))

    if nonfinite:  # zero the offending samples so that 0 * nan does not poison the sums
        ghosted = {p: [f.keep(finite) for f in fs] for p, fs in ghosted.items()}
        materialized = {p: _mask(finite, g) for p, g in materialized.items()}

    sums: dict[nn.Parameter, Tensor] = {}
    raws: dict[nn.Parameter, Tensor] | None = {} if raw else None
    ones = finite.to(torch.float32)
    for p, fs in ghosted.items():
        sums[p] = sum_over(fs, coef[group_of[p]])
        if raws is not None:
            raws[p] = sum_over(fs, ones)
    for p, gs in materialized.items():
        sums[p] = torch.einsum("b,b...->...", coef[group_of[p]].to(gs.dtype), gs)
        if raws is not None:
            raws[p] = gs.sum(0)
    return ClippedSums(sums=sums, norms=norms, nonfinite=nonfinite, raw=raws, ghosted=len(ghosted))


def sum_over(factors: list[Outer], coef: Tensor) -> Tensor:
    total = factors[0].weighted_sum(coef)
    for f in factors[1:]:
        total = total + f.weighted_sum(coef)
    return total


@torch.no_grad()
def per_sample_grads(capture: GradCapture, uses: list[Use]) -> dict[nn.Parameter, Tensor]:
    """Materialized per-sample gradients ``{param: (B, *shape)}`` summed over every use."""
    out: dict[nn.Parameter, Tensor] = {}
    for use in uses:
        for local, gs in capture.rule(use.module).per_sample(use).items():
            p = use.params[local]
            out[p] = out[p] + gs if p in out else gs
    return out
