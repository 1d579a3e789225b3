"""Per-sample clipping by group and the clipped sum, from the recorded layer uses.

For groups ``G`` with thresholds ``C_g``, sample ``b`` contributes
``c_gb * grad_b[p]`` to every parameter ``p`` of group ``g``, where
``c_gb = min(1, C_g / (||grad_b restricted to g|| + 1e-6))``.  The clipped group sum thus has
L2 sensitivity ``C_g`` under adding or removing one sample.

Norms come from ghost norms where a rule says they are cheaper, otherwise from materialized
per-sample gradients.  Parameters used by several layers (tied embeddings) are always
materialized, as the norm of a sum is not the sum of norms.  A sample whose gradient is not
finite contributes nothing (coefficient 0), which keeps the sensitivity bound.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .grad_sample import GradCapture, Use, trainable


@dataclass
class ClippedSums:
    """The result of clipping one (physical) batch."""

    sums: dict[nn.Parameter, Tensor]  # sum_b c_{g(p) b} grad_b[p]
    norms: dict[str, Tensor]  # per group, per sample: ||grad_b|_g|| before clipping
    nonfinite: int  # samples dropped for a non-finite gradient


def _batch_size(uses: list[Use]) -> int:
    return uses[0].grad.shape[0] if uses else 0


def clip_and_sum(
    capture: GradCapture,
    uses: list[Use],
    group_of: dict[nn.Parameter, str],
    clip: dict[str, float],
    *,
    ghost: bool = True,
) -> ClippedSums:
    """Clip every sample's gradient per group at ``clip[group]`` and sum over samples."""
    batch = _batch_size(uses)
    uses_of: dict[nn.Parameter, int] = defaultdict(int)
    for use in uses:
        for p in trainable(use.module).values():
            uses_of[p] += 1

    sq: dict[str, Tensor] = {}
    materialized: dict[nn.Parameter, Tensor] = {}
    ghost_uses: list[Use] = []

    def add_sq(group: str, value: Tensor) -> None:
        sq[group] = sq[group] + value if group in sq else value

    for use in uses:
        rule = capture.rule(use.module)
        params = trainable(use.module)
        if not params:
            continue
        solo = all(uses_of[p] == 1 for p in params.values())
        if ghost and solo and rule.ghost_cheaper(use):
            for local, n2 in rule.norm_sq(use).items():
                add_sq(group_of[params[local]], n2.to(torch.float32))
            ghost_uses.append(use)
        else:
            for local, gs in rule.per_sample(use).items():
                p = params[local]
                materialized[p] = materialized[p] + gs if p in materialized else gs
    for p, gs in materialized.items():
        add_sq(group_of[p], gs.flatten(1).to(torch.float32).pow(2).sum(1))

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

    if nonfinite:  # zero the offending samples so that 0 * nan does not poison the sum
        keep = finite
        for use in ghost_uses:
            shape = (-1,) + (1,) * (use.grad.dim() - 1)
            use.grad = torch.where(keep.view(shape), use.grad, 0.0)
            a = use.args[0]
            if torch.is_floating_point(a):
                use.args = (
                    torch.where(keep.view((-1,) + (1,) * (a.dim() - 1)), a, 0.0),
                    *use.args[1:],
                )
        for p, gs in materialized.items():
            materialized[p] = torch.where(keep.view((-1,) + (1,) * (gs.dim() - 1)), gs, 0.0)

    sums: dict[nn.Parameter, Tensor] = {}

    def add_sum(p: nn.Parameter, value: Tensor) -> None:
        sums[p] = sums[p] + value if p in sums else value

    for use in ghost_uses:
        params = trainable(use.module)
        local_coef = {local: coef[group_of[p]] for local, p in params.items()}
        for local, s in capture.rule(use.module).weighted_sum(use, local_coef).items():
            add_sum(params[local], s)
    for p, gs in materialized.items():
        add_sum(p, torch.einsum("b,b...->...", coef[group_of[p]].to(gs.dtype), gs))
    return ClippedSums(sums=sums, norms=norms, nonfinite=nonfinite)


def per_sample_grads(capture: GradCapture, uses: list[Use]) -> dict[nn.Parameter, Tensor]:
    """Materialized per-sample gradients ``{param: (B, *shape)}`` summed over every use."""
    out: dict[nn.Parameter, Tensor] = {}
    for use in uses:
        params = trainable(use.module)
        for local, gs in capture.rule(use.module).per_sample(use).items():
            p = params[local]
            out[p] = out[p] + gs if p in out else gs
    return out
