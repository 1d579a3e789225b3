"""Record every use of a trainable layer and its output gradient.

Layers whose rule can *fuse* (Linear, Conv1D, Embedding, the LoRA pair) get their ``forward``
wrapped while the capture is attached: during a recorded step the call runs through the rule's
autograd function, which stores the output gradient in the :class:`Use` and skips the ordinary
parameter gradient.  Other layers get a forward hook that stores the (detached) inputs and
registers a hook on the output tensor, to which autograd hands the output gradient.
Each call of a layer is its own :class:`Use`, so layers called several times per forward and
parameters shared between layers (tied embeddings) are handled exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .fallback import FuncRule
from .rules import CROSS_SAMPLE, FusedRule, Rule, Use, find_rule, trainable


class UnsupportedLayerError(TypeError):
    """A trainable layer for which no per-sample gradient exists or can be computed."""


def _detach(x: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


class GradCapture:
    """Records every use of the layers holding trainable parameters (fused rules wrap the
    layer's ``forward``, other rules use forward hooks); collects :class:`Use` records."""

    def __init__(self, model: nn.Module, *, fallback: bool = True) -> None:
        self.model = model
        self.layers: list[tuple[str, nn.Module, Rule]] = []
        self.uses: list[Use] = []
        self.active = False
        self.batch_size: int | None = None  # set by the caller before each forward
        self._handles: list[Any] = []
        self._wrapped: list[tuple[nn.Module, Any]] = []
        for name, module in model.named_modules():
            rule = find_rule(module)
            if not (rule.params(module) if rule is not None else trainable(module)):
                continue
            if isinstance(module, CROSS_SAMPLE):
                raise UnsupportedLayerError(
                    f"layer '{name}' ({type(module).__name__}) mixes samples within a batch, so "
                    "per-sample gradients do not exist. Fix: replace it with GroupNorm or "
                    "LayerNorm, or freeze it with requires_grad_(False)."
                )
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
        if self._handles or self._wrapped:
            return
        for _, module, rule in self.layers:
            if isinstance(rule, FusedRule):
                self._wrap(module, rule)
            else:
                hook = module.register_forward_hook(self._forward_hook, with_kwargs=True)
                self._handles.append(hook)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, had in self._wrapped:
            if had is None:
                del module.forward
            else:
                module.forward = had
        self._wrapped.clear()
        self.uses.clear()

    @property
    def recording(self) -> bool:
        return self.active and torch.is_grad_enabled()

    def _wrap(self, module: nn.Module, rule: FusedRule) -> None:
        """Route ``module``'s calls through ``rule.fused_call`` while recording."""
        original = module.forward
        self._wrapped.append((module, module.__dict__.get("forward")))

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.recording:
                out = rule.fused_call(self, module, args, kwargs)
                if out is not None:
                    return out
                out = original(*args, **kwargs)
                if not rule.hook_fallback:  # e.g. the LoRA pair: its leaves record themselves
                    return out
                replaced = self._forward_hook(module, args, kwargs, out)
                return out if replaced is None else replaced
            return original(*args, **kwargs)

        module.forward = forward

    def record(
        self, module: nn.Module, x: Tensor, params: dict[str, nn.Parameter]
    ) -> tuple[Use, Tensor]:
        """A new use of ``module`` on batch-first input ``x``, and ``x`` itself (a first axis of
        1 is broadcast to the batch, so each sample gets its own gradient)."""
        name, _ = self._rules[id(module)]
        b = self.batch_size
        if b is not None and x.shape[0] != b:
            if x.dim() == 0 or x.shape[0] != 1:
                self._not_batch_first(name, module, x.shape[0] if x.dim() else 0)
            x = x.expand(b, *x.shape[1:])
        use = Use(module=module, name=name, args=(x.detach(),), kwargs={}, params=params)
        self.uses.append(use)
        return use, x

    def _not_batch_first(self, name: str, module: nn.Module, first: int) -> None:
        raise UnsupportedLayerError(
            f"layer '{name}' ({type(module).__name__}) sees a first axis of {first}, "
            f"not the batch size {self.batch_size}: its inputs are not batch-first, so per-sample "
            "gradients cannot be attributed. Fix: keep the batch axis first through this "
            "layer, or freeze it."
        )

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.recording:
            return None
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, Tensor) or not out.requires_grad:
            return None
        name, rule = self._rules[id(module)]
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
                self._not_batch_first(name, module, out.shape[0])
            # A layer shared by the whole batch (e.g. position embeddings of shape (1, T, d))
            # whose output is broadcast later: expand it so each sample gets its own gradient.
            out = out.expand(b, *out.shape[1:])
            args = (args[0].expand(b, *args[0].shape[1:]), *args[1:])
            replaced = out if isinstance(output, Tensor) else type(output)((out, *output[1:]))
        use = Use(
            module=module, name=name, args=args, kwargs=_detach(kwargs), params=rule.params(module)
        )
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
