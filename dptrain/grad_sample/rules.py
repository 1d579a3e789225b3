"""Per-sample gradient rules, one per layer type, kept in a registry.

A rule sees one *use* of a layer in the forward pass: the layer input ``a`` (batch first) and
the gradient ``g`` of the summed per-sample loss with respect to the layer output.  Because the
loss is a sum over samples, ``g[b]`` depends on sample ``b`` alone, and the per-sample gradient
of a weight is a contraction of ``a[b]`` with ``g[b]`` over the sequence axis.

Every rule can

* ``per_sample``: materialize per-sample gradients ``{param: (B, *shape)}``;
* ``weighted_sum``: return ``sum_b coef[b] * grad_b`` for each parameter (the clipped sum);
* optionally ``norm_sq`` without materializing (ghost norms), when ``ghost_cheaper`` says so.

The defaults derive ``weighted_sum`` from ``per_sample``; rules override where a cheaper
contraction exists.  Only parameters with ``requires_grad`` are returned: frozen ones cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Use:
    """One call of a layer during the forward pass, completed by its output gradient."""

    module: nn.Module
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad: Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)

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

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        raise NotImplementedError

    def ghost_cheaper(self, use: Use) -> bool:
        """Whether ``norm_sq`` + ``weighted_sum`` beat materializing for this use."""
        return False

    def norm_sq(self, use: Use) -> dict[str, Tensor]:
        """Squared per-sample gradient norms ``{param: (B,)}`` without materializing."""
        return {n: g.flatten(1).pow(2).sum(1) for n, g in self.per_sample(use).items()}

    def weighted_sum(self, use: Use, coef: dict[str, Tensor]) -> dict[str, Tensor]:
        """``sum_b coef[name][b] * grad_b[name]`` for every trainable parameter."""
        return {
            n: torch.einsum("b,b...->...", coef[n].to(g.dtype), g)
            for n, g in self.per_sample(use).items()
        }


class LinearRule(Rule):
    """``y = a W^T + bias``: per-sample ``dW_b = sum_t g_bt a_bt^T``, ``dbias_b = sum_t g_bt``.

    Ghost norm (Li et al. 2022): ``||dW_b||^2 = sum_{t,s} (a_bt . a_bs)(g_bt . g_bs)``, costing
    ``T^2 (d_in + d_out)`` instead of ``T d_in d_out`` per sample.
    """

    transposed = False  # HF Conv1D stores W as (in, out)

    def _ag(self, use: Use) -> tuple[Tensor, Tensor]:
        return _flat(use.input), _flat(use.grad)

    def _weight(self, a: Tensor, g: Tensor) -> Tensor:
        if self.transposed:
            return torch.einsum("bti,bto->bio", a, g)
        return torch.einsum("bto,bti->boi", g, a)

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        a, g = self._ag(use)
        params = trainable(use.module)
        out = {}
        if "weight" in params:
            out["weight"] = self._weight(a, g)
        if "bias" in params:
            out["bias"] = g.sum(1)
        return out

    def ghost_cheaper(self, use: Use) -> bool:
        a, g = _flat(use.input), _flat(use.grad)
        t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        return t * (d_in + d_out) < d_in * d_out

    def norm_sq(self, use: Use) -> dict[str, Tensor]:
        a, g = self._ag(use)
        params = trainable(use.module)
        out = {}
        if "weight" in params:
            if a.shape[1] == 1:
                out["weight"] = a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
            else:
                out["weight"] = (
                    torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
                ).sum((1, 2))
        if "bias" in params:
            out["bias"] = g.sum(1).pow(2).sum(1)
        return out

    def weighted_sum(self, use: Use, coef: dict[str, Tensor]) -> dict[str, Tensor]:
        a, g = self._ag(use)
        params = trainable(use.module)
        out = {}
        if "weight" in params:
            gw = g * coef["weight"].to(g.dtype)[:, None, None]
            a2, g2 = a.reshape(-1, a.shape[-1]), gw.reshape(-1, gw.shape[-1])
            out["weight"] = a2.T @ g2 if self.transposed else g2.T @ a2
        if "bias" in params:
            out["bias"] = coef["bias"].to(g.dtype) @ g.sum(1)
        return out


class Conv1DRule(LinearRule):
    """Hugging Face ``Conv1D`` (GPT-2): ``y = a W + bias`` with ``W`` of shape (in, out)."""

    transposed = True


class EmbeddingRule(Rule):
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

    def _ids_grad(self, use: Use) -> tuple[Tensor, Tensor]:
        self._check(use.module)
        ids = use.input.reshape(use.input.shape[0], -1)
        g = _flat(use.grad)
        pad = use.module.padding_idx
        if pad is not None:
            g = g * (ids != pad).unsqueeze(-1).to(g.dtype)
        return ids, g

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        if "weight" not in trainable(use.module):
            return {}
        ids, g = self._ids_grad(use)
        b, t, d = g.shape
        out = torch.zeros(b, use.module.num_embeddings, d, dtype=g.dtype, device=g.device)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(b, t, d), g)
        return {"weight": out}

    def ghost_cheaper(self, use: Use) -> bool:
        return True

    def norm_sq(self, use: Use) -> dict[str, Tensor]:
        if "weight" not in trainable(use.module):
            return {}
        ids, g = self._ids_grad(use)
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        return {"weight": (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))}

    def weighted_sum(self, use: Use, coef: dict[str, Tensor]) -> dict[str, Tensor]:
        if "weight" not in trainable(use.module):
            return {}
        ids, g = self._ids_grad(use)
        gw = (g * coef["weight"].to(g.dtype)[:, None, None]).reshape(-1, g.shape[-1])
        out = torch.zeros_like(use.module.weight)
        out.index_add_(0, ids.reshape(-1), gw)
        return {"weight": out}


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
