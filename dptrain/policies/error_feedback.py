"""Error-feedback clipping: DiceSGD (Zhang, Bu, Wu & Hong, ICLR 2024) as a policy.

Per step, in the units of the clipped sum (``S = qN`` the expected batch size)::

    F      = clip(E, C2)                                 one vector over all trainable parameters
    update = (sum_b clip(g_b, C1) + F + N(0, s^2 I)) / S      s = sigma * C1 in every group
    E     <- E + sum_b g_b - sum_b clip(g_b, C1) - F     the hidden error state, never released

``clip(g_b, C1)`` is flat or per group exactly as in the static policy (``C_g = C1 / sqrt(G)``).
The error gives back, at most ``C2`` per step, what clipping took away, which removes
clipping's constant bias.  ``error_clip`` (C2) is in the units of ``clip``: a norm before the
division by ``S`` (the paper's mean-unit C2 is ``error_clip / S``).  ``error_clip = 0`` is
exactly the static policy.

Privacy contract.  ``E`` depends on *unclipped* gradients, and a record's influence on it
persists after the record was sampled, so a step is charged as the ``error_feedback`` event
``(q, sigma, rho = 2 C2 / C1)`` of :mod:`accountants.error_feedback` (theorem and proof there):
a Poisson-subsampled Gaussian for the clipped sum plus a *non-subsampled* Gaussian of
sensitivity ``2 C2`` for the feedback.  Only the RDP accountant implements it
(``accountants = ("rdp",)``); calibration finds the sigma that meets a target epsilon under it.
The error buffer is kept in checkpoints (keyed by parameter name, restored exactly on resume),
which, like all checkpoints, are for the data owner only.

Non-finite samples.  The engine drops them from the clipped sum but cannot remove them from the
raw (autograd) sum, which it zeroes where it is not finite, losing the other samples' raw
gradients there.  On such a step the error takes no new clipping residual (``E <- E - F``);
``E`` is also kept finite.  Neither affects privacy: the bound uses only ``||F|| <= C2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from accountants import ERROR_FEEDBACK, Event, calibrate_noise, error_feedback_event
from accountants.error_feedback import FEEDBACK, feedback_sensitivity

from ..clipping import clip_coef, norm_bound
from ..errors import InputError
from .base import NoiseFn, StepPlan, StepSums
from .registry import check_accountant
from .static import StaticPolicy, split_clip


class ErrorFeedbackOptions(BaseModel):
    """Recipe keys of ``policy: error_feedback`` beyond name, grouping, clip, noise_multiplier."""

    model_config = ConfigDict(extra="forbid")
    error_clip: float = Field(
        ge=0,
        allow_inf_nan=False,
        description="C2: norm of the fed-back error per step, in the units of clip (C1). Its "
        "privacy cost is that of a full-batch Gaussian of sensitivity 2*C2: keep it near "
        "sample_rate * clip",
    )


class ErrorFeedbackPolicy(StaticPolicy):
    """DiceSGD: clip at ``clip`` (C1), feed back the clipping error clipped at ``error_clip`` (C2)."""

    name = "error_feedback"
    needs_raw_sums = True
    accountants = ("rdp",)
    frozen_settings = StaticPolicy.frozen_settings | {"error_clip"}

    def __init__(
        self,
        clip: float = 1.0,
        noise_multiplier: float | None = None,
        group_clip: dict[str, float] | None = None,
        *,
        error_clip: float,
    ) -> None:
        super().__init__(clip, noise_multiplier, group_clip)
        if not (error_clip >= 0 and math.isfinite(error_clip)):
            raise ValueError(f"error_clip must be finite and >= 0, got {error_clip}")
        self.error_clip = float(error_clip)
        self.error: dict[str, Tensor] = {}  # E by parameter name, sum units
        # (C1, rho, sigma) of the last calibrate(): its assumption holds while sigma is in use
        self._calibrated: tuple[float, float, float] | None = None

    @property
    def feedback(self) -> float:
        """``rho = 2 C2 / C1``, the fed-back error's sensitivity in units of the clip norm."""
        return feedback_sensitivity(self.clip, self.error_clip)

    # -- accounting --------------------------------------------------------------------------

    def calibrate(
        self,
        target_epsilon: float,
        delta: float,
        *,
        sample_rate: float,
        steps: int,
        accountant: str,
    ) -> float:
        """The smallest sigma meeting the target under the error-feedback bound (RDP only), for
        ``rho = 2 C2 / C1`` with the current ``clip`` as C1.  Before :meth:`bind`, a
        ``group_clip`` naming every group will set C1 to ``sqrt(sum_g C_g^2)``: bind then
        refuses a calibration made for another rho (see :meth:`bind`)."""
        check_accountant(self, accountant)
        sigma = calibrate_noise(
            target_epsilon,
            delta,
            sample_rate,
            steps,
            accountant,
            kind=ERROR_FEEDBACK,
            params={FEEDBACK: self.feedback},
        )
        self.noise_multiplier = sigma  # refused once bound: then nothing changes
        self._calibrated = (self.clip, self.feedback, sigma)
        return sigma

    def bind(
        self, groups: Sequence[str], *, sample_rate: float, expected_batch_size: float
    ) -> None:
        """As the static policy; first refuses a sigma that :meth:`calibrate` found for another
        rho than the bound one (a ``group_clip`` naming every group replaces C1 = ``clip`` by
        ``sqrt(sum_g C_g^2)``): the steps would be charged correctly, at the bound rho, but
        would miss the target epsilon.  A ``noise_multiplier`` set by hand after the
        calibration is not refused: no target was computed for it, and every step is charged
        as the event ``(q, sigma, rho)`` of the sigma and rho in use (:meth:`event`)."""
        clips = split_clip(groups, self.clip, self.group_clip)
        c1 = math.sqrt(sum(c**2 for c in clips.values())) if self.group_clip else self.clip
        rho = feedback_sensitivity(c1, self.error_clip)
        calibrated = self._calibrated is not None and self.noise_multiplier == self._calibrated[2]
        if calibrated and not math.isclose(rho, self._calibrated[1], rel_tol=1e-9):
            was_clip, was_rho, _ = self._calibrated
            raise ValueError(
                f"error_feedback: calibrate() found sigma={self.noise_multiplier!r} for C1 = "
                f"clip = {was_clip!r} (rho = 2 C2 / C1 = {was_rho:.6g}), but group_clip names "
                f"every group, so bind() sets C1 = sqrt(sum_g C_g^2) = {c1!r} (rho = "
                f"{rho:.6g}) and that sigma misses the target epsilon. Fix: construct "
                f"ErrorFeedbackPolicy(clip={c1!r}, ...) with the same group_clip and call "
                "calibrate() again before binding"
            )
        super().bind(groups, sample_rate=sample_rate, expected_batch_size=expected_batch_size)

    def planned_event(self, sample_rate: float) -> Event:
        return error_feedback_event(sample_rate, self.charged_sigma, self.feedback)

    def event(self, plan: StepPlan) -> Event:
        return error_feedback_event(self.sample_rate, plan.noise_multiplier, self.feedback)

    # -- the step ----------------------------------------------------------------------------

    def release(self, sums: StepSums, plan: StepPlan, noise: NoiseFn) -> dict[nn.Parameter, Tensor]:
        if sums.raw is None or sums.names is None:
            raise RuntimeError("the error_feedback policy needs raw sums and parameter names")
        error = {p: self._buffer(p, sums.names[p]) for p in sums.clipped}
        unknown = set(self.error) - set(sums.names.values())
        if unknown:
            raise InputError(
                f"the error state has parameters the model lacks ({sorted(unknown)[:3]}): it "
                "comes from another model or LoRA configuration"
            )
        # ||F|| <= C2: a certified upper bound on ||E||, and the coefficient rounded toward
        # zero into each buffer's dtype (a Python float would be rounded to nearest, maybe up)
        norm = norm_bound(error.values())
        scales = {e.dtype: clip_coef(norm, self.error_clip, e.dtype) for e in error.values()}
        out = {}
        for p, clipped in sums.clipped.items():
            fed = error[p] * scales[error[p].dtype].to(error[p].device)
            released = clipped.to(fed.dtype) + fed  # at least float32, so that ||F|| <= C2
            out[p] = (released + noise(released, plan.noise_std[sums.group_of[p]])) / (
                sums.expected_batch_size
            )
            residual = 0.0 if sums.nonfinite else sums.raw[p] - clipped
            e = error[p] - fed + residual
            big = torch.finfo(e.dtype).max
            self.error[sums.names[p]] = torch.nan_to_num(e, nan=0.0, posinf=big, neginf=-big)
        return out

    def _buffer(self, p: nn.Parameter, name: str) -> Tensor:
        dtype = torch.promote_types(p.dtype, torch.float32)
        e = self.error.get(name)
        if e is None:
            return torch.zeros(p.shape, dtype=dtype, device=p.device)
        if e.shape != p.shape:
            raise InputError(
                f"the error state of {name} has shape {tuple(e.shape)}, the parameter "
                f"{tuple(p.shape)}: the checkpoint comes from another model or LoRA configuration"
            )
        return e.to(device=p.device, dtype=dtype)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"error": {n: e.detach().cpu().clone() for n, e in self.error.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.error = {n: e.clone() for n, e in state.get("error", {}).items()}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "error_clip": self.error_clip,
            "feedback_sensitivity": self.feedback,
            "accounting": "error_feedback (RDP; accountants.error_feedback)",
        }
