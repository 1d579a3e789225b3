"""The two autograd nodes through which recorded parameters reach the loss.

* :class:`Fused` runs one call of a registered function (:mod:`.ops`) with the parameters as
  constants: its backward stores the output gradient in the :class:`~.ops.Use` and returns the
  data inputs' gradients only, so autograd never forms the (discarded) ordinary parameter
  gradient; the parameters are inputs of the node (so that its output requires grad) but get
  ``None``.  The input gradient is the rule's closed form, or the aten backward of the
  function's aten forward with the statistics that forward saved (norms; transposed
  convolutions need none), or, for the rest, ``torch.autograd.grad`` of an inner graph of
  the function kept from the forward.
* :class:`Alias` stands for a parameter inside a module call whose per-sample gradients come
  from re-running that call per sample (:mod:`.local`): ``forward`` returns the parameter's
  value, ``backward`` discards the batch gradient.

So every gradient path into a trainable parameter is a ``Fused`` node, an ``Alias`` node, or a
path the capture knows is direct (per-sample by the autograd fallback); a gradient that reaches
a parameter any other way is seen by a hook on the parameter and the step is redone or refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .ops import Use

if TYPE_CHECKING:
    from .capture import GradCapture


class Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, capture: GradCapture, use: Use, x: Tensor, *params: Tensor) -> Tensor:
        ctx.capture, ctx.use, ctx.n = capture, use, len(params)
        ctx.version = x._version
        rule, call = use.rule, use.call
        ctx.inner = ctx.saved = None
        if x.requires_grad and not rule.closed_input_grad(call):
            out = None if _GENERIC[0] else rule.saved_forward(call, x)
            if out is not None:  # the aten forward, its statistics kept for the aten backward
                y, ctx.saved = out
                return _own(y)
            with torch.enable_grad():  # differentiate the function itself, w.r.t. x only
                xd = x.detach().requires_grad_(True)
                y = rule.compute(call, xd)
            ctx.inner = (xd, y)
            return y.detach()
        return _own(rule.compute(call, x))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        use = ctx.use
        x = use.call.input
        if x._version != ctx.version:
            raise RuntimeError(
                f"the input of '{use.name}' was modified in place after the forward pass, so its "
                "per-sample gradients would be wrong. Fix: avoid in-place operations on "
                "activations (e.g. use relu(x) rather than relu_(x)) while training privately."
            )
        if not ctx.capture.replaying:  # batch-first, also for a flattened (B*T, ...) call
            use.add_grad(
                g if use.call.view_shape is None else g.reshape(x.shape[0], -1, *g.shape[1:])
            )
        gx = None
        if ctx.needs_input_grad[2]:
            if ctx.saved is not None:
                gx = use.rule.saved_input_grad(use.call, ctx.saved, g)
                gx = gx.reshape(x.shape).to(x.dtype)  # autograd's cast back from autocast's
            elif ctx.inner is not None:
                xd, y = ctx.inner
                (gx,) = torch.autograd.grad(y, xd, g, retain_graph=ctx.capture.replaying)
            else:
                gx = use.rule.input_grad(use, g).reshape(x.shape).to(x.dtype)
        return (None, None, gx, *([None] * ctx.n))


def _own(y: Tensor) -> Tensor:
    """``y`` as a tensor of its own: ``F.linear`` on a non-contiguous 3-d input returns a view
    of its 2-d product, and autograd forbids modifying a custom Function's view output in place
    (wav2vec2 writes its mask embedding into the feature projection's output)."""
    return y.clone() if y._base is not None else y


_GENERIC = [False]  # True inside generic_input_grads()


@contextlib.contextmanager
def generic_input_grads() -> Iterator[None]:
    """Fused nodes started inside differentiate their function with an inner graph (one nested
    ``torch.autograd.grad`` per call) instead of calling the aten backward with the forward's
    saved statistics (:meth:`~.ops.OpRule.saved_forward`): the reference the saved path is
    tested and timed against; the results are the same bits."""
    before = _GENERIC[0]
    _GENERIC[0] = True
    try:
        yield
    finally:
        _GENERIC[0] = before


class Alias(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, p: Tensor) -> Tensor:
        return p.detach()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> None:
        return None
