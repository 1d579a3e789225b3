"""Per-sample gradients of a module call that uses its parameters through functions with no rule.

For one call ``y = f(theta, x)`` of a module whose parameters ``theta`` enter through arbitrary
torch functions (an RMSNorm that computes ``(1 + w) * n(x)``, ``MultiheadAttention``, an RNN, a
user layer), with output gradients ``g``, sample ``b``'s gradient is

    grad_theta <f(theta, x_b), g_b>

evaluated for every sample with ``vmap``: exact for any module whose output for sample ``b``
depends on sample ``b`` alone.  The batch axis of every input and output is the one the
capture's probe observed (:mod:`.plan`), never guessed from a shape; inputs without a batch axis
are passed unchanged to every sample.  The call is re-run with the module's own ``forward``
(through ``torch.func.functional_call``), or, for the recurrent layers, with the recurrence
written out (``torch``'s fused RNN kernels cannot run per sample under ``vmap``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .ops import Use


@dataclass
class LocalCall:
    """One call of a module: its inputs (pytree leaves with their batch axes, None for shared),
    and the batch axes of its outputs' leaves."""

    module: nn.Module
    leaves: list[Any]
    spec: Any
    in_axes: list[int | None]
    out_axes: list[int | None]

    @property
    def input(self) -> Tensor:  # for the in-place check of fused nodes (unused here)
        return self.leaves[0]


class LocalRule:
    """``vmap(grad)`` of one module call; ``use.params`` maps qualified names (relative to the
    module) to the parameters whose per-sample gradients it gives."""

    name = "module"

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        call: LocalCall = use.call
        names = list(use.params)
        theta = {n: use.params[n].detach() for n in names}
        grads: list[Tensor | None] = use.grad
        batched = [i for i, a in enumerate(call.in_axes) if a is not None]
        outs = [i for i, g in enumerate(grads) if g is not None]
        forward = _forward_of(call.module)

        def loss(theta: dict[str, Tensor], xs: list[Tensor], gs: list[Tensor]) -> Tensor:
            leaves = list(call.leaves)
            for i, x in zip(batched, xs, strict=True):
                leaves[i] = x.unsqueeze(call.in_axes[i])
            args, kwargs = tree_unflatten(leaves, call.spec)
            out_leaves = tree_flatten(forward(call.module, theta, args, kwargs))[0]
            total = 0
            for i, g in zip(outs, gs, strict=True):
                total = total + (out_leaves[i] * g.unsqueeze(call.out_axes[i])).sum()
            return total

        xs = [call.leaves[i] for i in batched]
        gs = [grads[i] for i in outs]
        in_dims = (None, [call.in_axes[i] for i in batched], [call.out_axes[i] for i in outs])
        if type(call.module) not in _NO_VMAP:
            try:
                return vmap(grad(loss), in_dims=in_dims)(theta, xs, gs)
            except RuntimeError:  # e.g. an autograd.Function without a vmap rule inside
                _NO_VMAP.add(type(call.module))
        return _one_by_one(loss, theta, xs, gs, in_dims)

    def outer(self, use: Use) -> None:
        return None


_NO_VMAP: set[type] = set()  # module classes whose re-run has no vmap rule: one sample at a time


def _one_by_one(loss: Any, theta: dict[str, Tensor], xs: list, gs: list, in_dims: tuple) -> Any:
    """The same per-sample gradients as ``vmap(grad(loss))``, one sample at a time: sample
    ``b``'s inputs and output gradients selected along their batch axes, differentiated by plain
    autograd (an autograd.Function without a functorch rule inside runs as in training)."""
    _, x_axes, g_axes = in_dims
    b = xs[0].shape[x_axes[0]] if xs else gs[0].shape[g_axes[0]]
    rows = []
    for i in range(b):
        xb = [x.select(a, i) for x, a in zip(xs, x_axes, strict=True)]
        gb = [g.select(a, i) for g, a in zip(gs, g_axes, strict=True)]
        with torch.enable_grad():  # plain autograd: torch.func's grad is a transform too
            leaf = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
            out = torch.autograd.grad(loss(leaf, xb, gb), list(leaf.values()), allow_unused=True)
        rows.append(
            {
                n: (g if g is not None else torch.zeros_like(theta[n]))
                for n, g in zip(leaf, out, strict=True)
            }
        )
    return {n: torch.stack([r[n] for r in rows]) for n in theta}


def _functional(module: nn.Module, theta: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
    return functional_call(module, theta, args, kwargs, strict=False)


def _forward_of(module: nn.Module):
    if isinstance(module, nn.RNNBase):
        return _rnn
    if isinstance(module, nn.RNNCellBase):
        return _rnn_cell
    return _functional


# -- recurrent layers, written out ----------------------------------------------------------------


def _cell(
    mode: str, x: Tensor, state: Any, w_ih, w_hh, b_ih, b_hh, nonlinearity: str, w_hr=None
) -> Any:
    gi = x @ w_ih.T
    gh = state[0] @ w_hh.T if mode == "LSTM" else state @ w_hh.T
    if b_ih is not None:
        gi = gi + b_ih
        gh = gh + b_hh
    if mode == "LSTM":
        _, c = state
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if w_hr is None else h @ w_hr.T), c
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * state
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    return act(gi + gh)


def _rnn(module: nn.RNNBase, theta: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` forward as plain tensor operations, reading the
    weights from ``theta`` where given (the rest from the module)."""
    m = module
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if m.batch_first:
        x = x.transpose(0, 1)  # (T, B, I)
    directions = 2 if m.bidirectional else 1
    b = x.shape[1]
    mode = m.mode
    proj = getattr(m, "proj_size", 0)
    zeros = x.new_zeros(m.num_layers * directions, b, m.hidden_size)
    if mode == "LSTM":
        h0, c0 = (
            hx
            if hx is not None
            else (x.new_zeros((*zeros.shape[:2], proj or m.hidden_size)), zeros)
        )
    else:
        h0, c0 = (hx if hx is not None else zeros), None

    def weight(name: str) -> Tensor | None:
        if name in theta:
            return theta[name]
        return getattr(m, name, None)

    layer_in = x
    h_n, c_n = [], []
    for layer in range(m.num_layers):
        outs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = [weight(f"{k}{sfx}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            w.append(getattr(m, "nonlinearity", "tanh"))
            if proj:
                w.append(weight(f"weight_hr{sfx}"))
            k = layer * directions + d
            state = (h0[k], c0[k]) if mode == "LSTM" else h0[k]
            steps = range(layer_in.shape[0] - 1, -1, -1) if d else range(layer_in.shape[0])
            seq = [None] * layer_in.shape[0]
            for t in steps:
                state = _cell(mode, layer_in[t], state, *w)
                seq[t] = state[0] if mode == "LSTM" else state
            outs.append(torch.stack(seq))
            h_n.append(state[0] if mode == "LSTM" else state)
            if mode == "LSTM":
                c_n.append(state[1])
        layer_in = torch.cat(outs, -1) if directions == 2 else outs[0]
    out = layer_in.transpose(0, 1) if m.batch_first else layer_in
    h = torch.stack(h_n)
    return (out, (h, torch.stack(c_n))) if mode == "LSTM" else (out, h)


def _rnn_cell(module: nn.RNNCellBase, theta: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
    """``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` forward as plain tensor operations."""
    m = module
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    mode = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}.get(type(m), "RNN")
    zeros = x.new_zeros(x.shape[0], m.hidden_size)
    state = hx if hx is not None else ((zeros, zeros) if mode == "LSTM" else zeros)
    w = [theta.get(k, getattr(m, k)) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return _cell(mode, x, state, *w, getattr(m, "nonlinearity", "tanh"))


def replays_exactly(module: nn.Module) -> bool:
    """Whether a re-run of this module reproduces its call: an RNN with dropout between its
    layers draws randomness inside a fused kernel that a re-run cannot redraw."""
    return not (isinstance(module, nn.RNNBase) and module.dropout and module.training)
