"""Forward hooks that record every use of a trainable layer and its output gradient.

A forward hook stores the layer's (detached) inputs and registers a hook on the output tensor;
autograd hands that hook the gradient of the summed per-sample loss with respect to the output.
Each call of a layer is its own :class:`Use`, so layers called several times per forward and
parameters shared between layers (tied embeddings) are handled exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .fallback import FuncRule
from .rules import CROSS_SAMPLE, Rule, Use, find_rule, trainable


class UnsupportedLayerError(TypeError):
    """A trainable layer for which no per-sample gradient exists or can be computed."""


def _detach(x: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


class GradCapture:
    """Hooks on every module owning trainable parameters; collects :class:`Use` records."""

    def __init__(self, model: nn.Module, *, fallback: bool = True) -> None:
        self.model = model
        self.layers: list[tuple[str, nn.Module, Rule]] = []
        self.uses: list[Use] = []
        self.active = False
        self.batch_size: int | None = None  # set by the caller before each forward
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            if not trainable(module):
                continue
            if isinstance(module, CROSS_SAMPLE):
                raise UnsupportedLayerError(
                    f"layer '{name}' ({type(module).__name__}) mixes samples within a batch, so "
                    "per-sample gradients do not exist. Fix: replace it with GroupNorm or "
                    "LayerNorm, or freeze it with requires_grad_(False)."
                )
            rule = find_rule(module)
            if rule is None:
                if not fallback:
                    raise UnsupportedLayerError(
                        f"layer '{name}' ({type(module).__name__}) has trainable parameters but no "
                        "per-sample gradient rule. Fix: freeze it, register a rule with "
                        "dptrain.grad_sample.register_rule, or enable the torch.func fallback."
                    )
                rule = FuncRule()
            self.layers.append((name, module, rule))
        self._rules = {id(m): (n, r) for n, m, r in self.layers}

    @property
    def fallback_layers(self) -> list[str]:
        """Names of layers handled by the ``torch.func`` fallback."""
        return [n for n, _, r in self.layers if isinstance(r, FuncRule)]

    def attach(self) -> None:
        if self._handles:
            return
        for _, module, _ in self.layers:
            self._handles.append(module.register_forward_hook(self._forward_hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.uses.clear()

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.active or not torch.is_grad_enabled():
            return None
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, Tensor) or not out.requires_grad:
            return None
        name, _ = self._rules[id(module)]
        args = _detach(args)
        replaced = None
        b = self.batch_size
        if b is not None and out.shape[0] != b:
            if (
                out.shape[0] != 1
                or not args
                or not isinstance(args[0], Tensor)
                or args[0].shape[0] != 1
            ):
                raise UnsupportedLayerError(
                    f"layer '{name}' ({type(module).__name__}) sees a first axis of {out.shape[0]}, "
                    f"not the batch size {b}: its inputs are not batch-first, so per-sample "
                    "gradients cannot be attributed. Fix: keep the batch axis first through this "
                    "layer, or freeze it."
                )
            # A layer shared by the whole batch (e.g. position embeddings of shape (1, T, d))
            # whose output is broadcast later: expand it so each sample gets its own gradient.
            out = out.expand(b, *out.shape[1:])
            args = (args[0].expand(b, *args[0].shape[1:]), *args[1:])
            replaced = out if isinstance(output, Tensor) else type(output)((out, *output[1:]))
        use = Use(module=module, name=name, args=args, kwargs=_detach(kwargs))
        self.uses.append(use)

        def on_grad(grad: Tensor) -> None:
            use.grad = grad.detach() if use.grad is None else use.grad + grad.detach()

        out.register_hook(on_grad)
        return replaced

    def rule(self, module: nn.Module) -> Rule:
        return self._rules[id(module)][1]

    def take(self) -> list[Use]:
        """The uses recorded since the last call that received a gradient."""
        uses = [u for u in self.uses if u.grad is not None]
        self.uses = []
        return uses
