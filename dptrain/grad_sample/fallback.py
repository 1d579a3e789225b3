"""``torch.func`` fallback for layers without a registered rule.

For one use of the layer with input ``a`` and output gradient ``g``, the per-sample gradient of
its own parameters is ``grad_p <f(p, a_b), g_b>`` evaluated per sample with ``vmap``: exact for any
layer whose output for sample ``b`` depends on sample ``b`` alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from .rules import Rule, Use, trainable


class FuncRule(Rule):
    """Per-sample gradients by ``vmap(grad(...))`` over the layer's own forward."""

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        module = use.module
        params = {n: p.detach() for n, p in trainable(module).items()}
        if not params:
            return {}
        batch = use.grad.shape[0]
        flat, spec = torch.utils._pytree.tree_flatten((use.args, use.kwargs))
        batched = [isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch for x in flat]
        xs = [x for x, is_b in zip(flat, batched, strict=True) if is_b]

        def loss(p: dict[str, Tensor], xs_b: list[Tensor], g_b: Tensor) -> Tensor:
            it = iter(xs_b)
            leaves: list[Any] = [
                next(it).unsqueeze(0) if is_b else x for x, is_b in zip(flat, batched, strict=True)
            ]
            args, kwargs = torch.utils._pytree.tree_unflatten(leaves, spec)
            out = functional_call(module, p, args, kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            return (out * g_b.unsqueeze(0)).sum()

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, use.grad)
