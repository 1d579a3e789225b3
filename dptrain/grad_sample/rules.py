"""Per-sample gradient rules, one per layer type, kept in a registry.

A rule sees one *use* of a layer in the forward pass: the layer input ``a`` (batch first) and
the gradient ``g`` of the summed per-sample loss with respect to the layer output.  Because the
loss is a sum over samples, ``g[b]`` depends on sample ``b`` alone, and the per-sample gradient
of a weight is a contraction of ``a[b]`` with ``g[b]`` over the sequence axis.

Every rule can

* ``per_sample``: materialize per-sample gradients ``{param: (B, *shape)}``;
* ``weighted_sum``: return ``sum_b coef[b] * grad_b`` for each parameter (the clipped sum);
* ``norm_sq``: squared per-sample norms.

Rules whose gradients are sums of outer products (Linear, HF Conv1D, Embedding, the LoRA A/B
pair) return them factorized (``outer``, see :mod:`.outer`): then norms come without
materializing (ghost norms), cross terms between uses of one weight are exact, and the clipped
sum is one contraction.  They also *fuse* their forward (``fused_call``): the layer runs inside
an autograd function whose backward records ``g`` and returns only the input gradient, so
autograd never computes the (discarded) ordinary parameter gradient.  Only parameters with
``requires_grad`` are returned: frozen ones cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .outer import Outer, inner

if TYPE_CHECKING:
    from .capture import GradCapture


@dataclass
class Use:
    """One call of a layer during the forward pass, completed by its output gradient."""

    module: nn.Module
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad: Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # trainable, by local name

    def __post_init__(self) -> None:
        if not self.params:
            self.params = trainable(self.module)

    @property
    def input(self) -> Tensor:
        return self.args[0]


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The layer's own (non-recursive) parameters that require gradients."""
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _flat(t: Tensor) -> Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle axes (T = 1 for (B, d))."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class Rule:
    """Base rule: subclasses implement ``per_sample``; the rest follows."""

    def params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable parameters whose per-sample gradients this rule gives for ``module``."""
        return trainable(module)

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        raise NotImplementedError

    def outer(self, use: Use) -> dict[str, Outer] | None:
        """Factorized per-sample gradients, or None where the rule has no such form."""
        return None

    def fused_call(
        self, capture: GradCapture, module: nn.Module, args: tuple, kwargs: dict
    ) -> Tensor | None:
        """Run ``module`` recording its use without parameter gradients, or None to decline
        (then the call runs normally and forward hooks record it)."""
        return None

    def norm_sq(self, use: Use) -> dict[str, Tensor]:
        """Squared per-sample gradient norms ``{param: (B,)}`` (ghost norms where factorized)."""
        factors = self.outer(use)
        if factors is not None:
            return {n: inner(f, f) for n, f in factors.items()}
        return {n: g.flatten(1).pow(2).sum(1) for n, g in self.per_sample(use).items()}

    def weighted_sum(self, use: Use, coef: dict[str, Tensor]) -> dict[str, Tensor]:
        """``sum_b coef[name][b] * grad_b[name]`` for every trainable parameter."""
        factors = self.outer(use)
        if factors is not None:
            return {n: f.weighted_sum(coef[n]) for n, f in factors.items()}
        return {
            n: torch.einsum("b,b...->...", coef[n].to(g.dtype), g)
            for n, g in self.per_sample(use).items()
        }


class _ParamFree(torch.autograd.Function):
    """``y = rule.compute(use)`` with autograd off inside; backward stores ``dL/dy`` in the use
    and returns only the input gradient.  Parameters are inputs (so that ``y`` requires grad)
    but get ``None``: their gradients are formed from the use, clipped, by the engine."""

    @staticmethod
    def forward(ctx: Any, rule: FusedRule, use: Use, x: Tensor, *params: Tensor) -> Tensor:
        ctx.rule, ctx.use, ctx.n = rule, use, len(params)
        ctx.version = x._version
        return rule.compute(use)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        use = ctx.use
        if use.input._version != ctx.version:
            raise RuntimeError(
                f"the input of layer '{use.name}' was modified in place after the forward pass, "
                "so its per-sample gradients would be wrong. Fix: avoid in-place operations on "
                "activations (e.g. use relu(x) rather than relu_(x)) while training privately."
            )
        use.grad = g if use.grad is None else use.grad + g
        gx = ctx.rule.input_grad(use) if ctx.needs_input_grad[2] else None
        return (None, None, gx, *([None] * ctx.n))


class FusedRule(Rule):
    """A rule with factorized gradients whose layer runs as a :class:`_ParamFree` function."""

    hook_fallback = True  # record a declined call with forward-hook semantics

    def supports(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        return not kwargs and len(args) == 1 and isinstance(args[0], Tensor)

    def fusable(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> dict[str, nn.Parameter] | None:
        """The trainable parameters if this call can be fused, else None."""
        if (
            getattr(module, "_hf_hook", None) is not None  # accelerate moves tensors in forward
            or not self.supports(module, args, kwargs)
            or torch.is_autocast_enabled(args[0].device.type)
        ):
            return None
        return self.params(module) or None

    def compute(self, use: Use) -> Tensor:
        """The layer's output from ``use.input`` (autograd is off)."""
        raise NotImplementedError

    def input_grad(self, use: Use) -> Tensor | None:
        """``dL/dx`` from ``use.grad``."""
        raise NotImplementedError

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        return {n: f.materialize() for n, f in self.outer(use).items()}

    def fused_call(
        self, capture: GradCapture, module: nn.Module, args: tuple, kwargs: dict
    ) -> Tensor | None:
        params = self.fusable(module, args, kwargs)
        if params is None:
            return None
        use, x = capture.record(module, args[0], params)
        return self.run(use, x, params)

    def run(self, use: Use, x: Tensor, params: dict[str, nn.Parameter]) -> Tensor:
        """``compute(use)`` as an autograd node of ``x`` and ``params`` (see :class:`_ParamFree`)."""
        return _ParamFree.apply(self, use, x, *params.values())


class LinearRule(FusedRule):
    """``y = a W^T + bias``: per-sample ``dW_b = sum_t g_bt a_bt^T``, ``dbias_b = sum_t g_bt``.

    Ghost norm (Li et al. 2022): ``||dW_b||^2 = sum_{t,s} (a_bt . a_bs)(g_bt . g_bs)``, costing
    ``T^2 (d_in + d_out)`` instead of ``T d_in d_out`` per sample.
    """

    transposed = False  # HF Conv1D stores W as (in, out)

    def outer(self, use: Use) -> dict[str, Outer]:
        a, g = _flat(use.input), _flat(use.grad)
        out = {}
        if "weight" in use.params:
            w = use.params["weight"]
            out["weight"] = Outer(a, g, w.shape[0]) if self.transposed else Outer(g, a, w.shape[0])
        if "bias" in use.params:
            out["bias"] = Outer(g, None, g.shape[-1])
        return out

    def compute(self, use: Use) -> Tensor:
        m = use.module
        if self.transposed:
            x = use.input
            y = torch.addmm(m.bias, x.reshape(-1, x.shape[-1]), m.weight)
            return y.view(*x.shape[:-1], m.weight.shape[1])
        return F.linear(use.input, m.weight, m.bias)

    def input_grad(self, use: Use) -> Tensor:
        w = use.module.weight
        return use.grad @ (w.T if self.transposed else w)


class Conv1DRule(LinearRule):
    """Hugging Face ``Conv1D`` (GPT-2): ``y = a W + bias`` with ``W`` of shape (in, out)."""

    transposed = True

    def supports(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        return super().supports(module, args, kwargs) and module.bias is not None


class EmbeddingRule(FusedRule):
    """``y_t = W[id_t]``: per-sample ``dW_b = sum_t onehot(id_bt) g_bt^T``.

    Ghost norm: ``||dW_b||^2 = sum_{t,s} [id_bt = id_bs] (g_bt . g_bs)``; rows at ``padding_idx``
    get no gradient, as in PyTorch.
    """

    def _check(self, module: nn.Embedding) -> None:
        if module.scale_grad_by_freq or module.sparse:
            raise ValueError(
                "nn.Embedding with scale_grad_by_freq=True or sparse=True couples samples in a "
                "batch; build it with the defaults for private training"
            )

    def outer(self, use: Use) -> dict[str, Outer]:
        if "weight" not in use.params:
            return {}
        self._check(use.module)
        ids = use.input.reshape(use.input.shape[0], -1)
        g = _flat(use.grad)
        pad = use.module.padding_idx
        if pad is not None:
            g = g * (ids != pad).unsqueeze(-1).to(g.dtype)
        return {"weight": Outer(ids, g, use.module.num_embeddings)}

    def supports(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        return (
            super().supports(module, args, kwargs)
            and module.max_norm is None  # renormalizes rows in place: leave it to autograd
            and not (module.scale_grad_by_freq or module.sparse)
        )

    def compute(self, use: Use) -> Tensor:
        return F.embedding(use.input, use.module.weight, use.module.padding_idx)

    def input_grad(self, use: Use) -> None:
        return None


class NormRule(Rule):
    """Elementwise affine normalization ``y = w * n(a) + bias`` over the last axes.

    Per-sample ``dw_b = sum_t g_bt * n(a_bt)``, ``dbias_b = sum_t g_bt``; ``n`` is the layer's
    own normalization, recomputed from the stored input.
    """

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        raise NotImplementedError

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        params = trainable(use.module)
        shape = next(iter(params.values())).shape if params else ()
        b = use.grad.shape[0]
        g = use.grad.reshape(b, -1, *shape)
        out = {}
        if "weight" in params:
            n = self.normalized(use.module, use.input).reshape(b, -1, *shape)
            out["weight"] = (g * n).sum(1)
        if "bias" in params:
            out["bias"] = g.sum(1)
        return out


class LayerNormRule(NormRule):
    def normalized(self, module: nn.LayerNorm, a: Tensor) -> Tensor:
        return F.layer_norm(a, module.normalized_shape, eps=module.eps)


class GroupNormRule(NormRule):
    """``nn.GroupNorm`` on (B, C, ...): the affine parameters act per channel."""

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        module = use.module
        n = F.group_norm(use.input, module.num_groups, eps=module.eps)
        g = use.grad
        axes = tuple(range(2, g.dim()))
        params = trainable(module)
        out = {}
        if "weight" in params:
            out["weight"] = (g * n).sum(axes) if axes else g * n
        if "bias" in params:
            out["bias"] = g.sum(axes) if axes else g
        return out


class RMSNormRule(NormRule):
    """Llama-style RMSNorm: ``n(a) = a / sqrt(mean(a^2) + eps)`` computed in float32."""

    def normalized(self, module: nn.Module, a: Tensor) -> Tensor:
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(module, "eps", None)
        if eps is None:
            eps = torch.finfo(a.dtype).eps
        x = a.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x.to(a.dtype)


_RULES: dict[type, Rule] = {}
_NAMED_RULES: dict[str, Rule] = {}


def register_rule(layer: type | str, rule: Rule) -> None:
    """Register ``rule`` for a layer class (or a class name, for classes we cannot import)."""
    if isinstance(layer, str):
        _NAMED_RULES[layer] = rule
    else:
        _RULES[layer] = rule


def find_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``'s exact class, then its bases, then its class name."""
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return _NAMED_RULES.get(type(module).__name__)


register_rule(nn.Linear, LinearRule())
register_rule(nn.Embedding, EmbeddingRule())
register_rule(nn.LayerNorm, LayerNormRule())
register_rule(nn.GroupNorm, GroupNormRule())
register_rule(nn.RMSNorm, RMSNormRule())
for _name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "T5LayerNorm"):
    register_rule(_name, RMSNormRule())
try:  # transformers is a dependency, but keep the engine importable without it
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    register_rule(_HFConv1D, Conv1DRule())
except ImportError:  # pragma: no cover
    pass

# Layers whose output for one sample depends on other samples: no per-sample gradient exists.
CROSS_SAMPLE: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)

RuleFactory = Callable[[nn.Module], Rule]
