"""Mixed precision for the private step: autocast, and a fixed loss scale for float16.

``training.precision``:

* ``fp32``: no autocast (the model's own dtype, ``model.dtype``);
* ``bf16``: the chunk's forward and backward run under ``torch.autocast(device, bfloat16)``;
* ``fp16``: likewise with ``float16``, and the per-sample losses are multiplied by a loss
  scale ``S`` before the backward pass so that small activation gradients do not underflow.

Per-sample norms and the clipped sums accumulate in float32 or wider whatever the precision
(:mod:`dptrain.clipping`); the parameters, the optimizer, the noise and the update stay in the
model's dtype.

Privacy contract of the loss scale.  With scaled losses ``S l_b`` every recorded output
gradient, and hence every per-sample gradient, is ``S g_b``.  :func:`unscale` divides them by
``S`` *before* clipping, so the clip ``C`` bounds the true per-sample gradient and the clipped
sum keeps L2 sensitivity ``C`` (clipping ``S g_b`` at ``C`` would bound ``g_b`` by ``C / S``
and the noise would be calibrated to the wrong sensitivity).  ``S`` is a power of two, so the
division is exact in every floating dtype except for results below the dtype's smallest
normal number.  ``S`` is a public constant of the recipe (``training.loss_scale``) and is
never adapted: a dynamic scaler shrinks ``S`` when some sample's gradient overflows, which
lets one record change how every other record's gradient is computed in later steps, and
the sensitivity argument no longer holds.  A sample whose scaled gradient overflows is not
finite and contributes nothing, a decision that depends on that sample alone (as for any
non-finite sample today); a step whose released update is not finite is charged to the
ledger and not applied (:class:`~dptrain.engine.PrivacyEngine`).  The data owner sees the
count of such samples in the metrics (``nonfinite``); many of them mean ``S`` is too large.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .grad_sample import Recorded

PrecisionName = Literal["fp32", "bf16", "fp16"]
DEFAULT_LOSS_SCALE = 2.0**12
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_loss_scale(scale: float) -> float:
    """``scale`` if it is a positive power of two, else ValueError."""
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0 and math.frexp(scale)[0] == 0.5):
        raise ValueError(f"the loss scale must be a positive power of two, got {scale!r}")
    return scale


@dataclass(frozen=True)
class Precision:
    """How the private step's forward and backward compute (see the module docstring)."""

    name: PrecisionName = "fp32"
    loss_scale: float = DEFAULT_LOSS_SCALE  # used by fp16 only

    def __post_init__(self) -> None:
        if self.name not in _AUTOCAST:
            raise ValueError(f"precision must be one of fp32, bf16, fp16, got {self.name!r}")
        object.__setattr__(self, "loss_scale", check_loss_scale(self.loss_scale))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST[self.name]

    @property
    def scale(self) -> float:
        """The factor on the losses before the backward pass (1 unless fp16)."""
        return self.loss_scale if self.name == "fp16" else 1.0

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` on ``device`` in this precision (a no-op for fp32)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def scaled(self, loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``loss_fn`` with its per-sample losses multiplied by :attr:`scale`."""
        s = self.scale
        if s == 1.0:
            return loss_fn

        def scaled_loss(model: Any, batch: Any) -> Tensor:
            return loss_fn(model, batch) * s

        return scaled_loss

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"precision": self.name}
        if self.name == "fp16":
            out["loss_scale"] = self.loss_scale
        return out


def unscale(recorded: Recorded, scale: float) -> Recorded:
    """``recorded`` with every output gradient and direct per-sample gradient divided by
    ``scale``: the per-sample gradients of the unscaled losses, before any clipping."""
    if scale == 1.0:
        return recorded
    inv = 1.0 / scale  # exact: scale is a power of two

    def div(g: Any) -> Any:
        if isinstance(g, Tensor):
            return g * inv
        if isinstance(g, (list, tuple)):
            return type(g)(div(x) for x in g)
        return g  # None: no gradient reached this output

    for use in recorded.uses:
        if "outer" in use.cache or "per_sample" in use.cache:
            raise RuntimeError("unscale() must run before anything is computed from the uses")
        use.grad = div(use.grad)
    direct = {p: g * inv for p, g in recorded.direct.items()}
    return Recorded(recorded.uses, direct, recorded.batch_size)
