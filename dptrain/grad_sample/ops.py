"""Per-sample rules for the torch functions that take parameters, keyed by function.

A trainable parameter reaches the loss only through calls of torch functions.  When a call is
one of the functions registered here, with trainable parameters only in its weight/bias
slots and its data input batch-first, the call runs as a fused node (:mod:`.fused`) that
records the input and, in the backward pass, the output gradient ``g``; the per-sample
gradients of its parameters then follow from ``(input, g)`` alone, because the loss is a sum
over samples and ``g[b]`` depends on sample ``b`` only.  The function is identified by what it
computes (``F.linear``, ``F.embedding``, ``conv2d``, ...), never by the class of the module that
calls it, so subclasses with their own ``forward`` (scaled embeddings, positional embeddings
that compute their own indices) are exact.

Rules in closed form (sums of outer products, so ghost norms apply, see :mod:`.outer`):

* ``linear``: ``dW_b = sum_t g_bt a_bt^T``, ``db_b = sum_t g_bt``;
* ``addmm(bias, a, W)`` on a flattened ``(B*T, d)`` view of a batch-first input (Hugging Face
  ``Conv1D``): the same with ``W`` stored as (in, out);
* ``embedding``: ``dW_b = sum_t onehot(id_bt) g_bt^T`` (rows at ``padding_idx`` get nothing);
* ``conv1d``/``conv2d`` with ``groups=1`` and numeric padding: ``dW_b = sum_l g_bl u_bl^T`` over
  output positions ``l``, with ``u`` the unfolded input patches;
* ``layer_norm``, ``rms_norm``, ``group_norm``: ``dw_b = sum g_b * n(a_b)``, ``db_b = sum g_b``
  with ``n`` the function's own normalization.  The input gradient of ``layer_norm`` and
  ``group_norm`` is their aten backward with the statistics of their aten forward, the calls
  autograd itself makes (:meth:`OpRule.saved_forward`); ``rms_norm`` is a composite whose
  decomposition differs by device, so it keeps the inner graph of the generic path.

Every other registered function (transposed and 3-d convolutions, grouped convolutions,
``instance_norm``, ``prelu``, ``embedding_bag`` on 2-d input) treats the samples of its batch
independently, so its per-sample gradients are ``vmap`` over the samples of ``grad`` of the
function itself: exact, with no rule to get wrong.  (The input gradient of a transposed
convolution is ``convolution_backward``, the call autograd makes.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from ..errors import UserError
from .outer import Outer


class UnsupportedLayerError(UserError, ValueError):
    """A use of a trainable parameter whose per-sample gradient cannot be computed exactly.

    Not a ``TypeError``: Python's operators turn a ``TypeError`` raised inside ``x * w`` into
    ``NotImplemented`` and retry the reflected operator, which would hide the refusal."""


@dataclass
class OpCall:
    """One call of a registered function: every argument by name, the data input's name, and
    the slots that hold trainable parameters (slot -> role, e.g. ``"mat2" -> "weight"``)."""

    rule: OpRule
    args: dict[str, Any]
    slots: dict[str, str]
    data: str = "input"  # the name of the batch-first data argument
    view_shape: tuple[int, ...] | None = None  # set when the data input was a flattened view

    @property
    def input(self) -> Tensor:
        """The batch-first data input (for a flattened ``(B*T, d)`` view, its (B, T, d) base)."""
        return self.args[self.data]

    def as_called(self, x: Tensor) -> Tensor:
        """``x`` in the shape the function was called with."""
        return x if self.view_shape is None else x.reshape(self.view_shape)


@dataclass
class Use:
    """One recorded use of trainable parameters, completed by its output gradient(s).

    ``params`` maps a role (a function slot like ``"weight"``, or a parameter's qualified name
    for a module-level use) to the parameter; superseded roles are removed from it."""

    rule: Any
    name: str
    call: Any
    params: dict[str, torch.nn.Parameter]
    seq: int = 0
    grad: Any = None
    cache: dict[str, Any] = field(default_factory=dict)

    def add_grad(self, g: Tensor) -> None:
        self.grad = g if self.grad is None else self.grad + g


class OpRule:
    """A registered function: its argument names and defaults, data input and parameter slots.

    Subclasses with a closed form implement ``outer`` (factorized gradients) and may override
    ``input_grad``; the rest follows from calling the function itself."""

    names: tuple[str, ...] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    input: str = "input"
    slots: ClassVar[dict[str, str]] = {"weight": "weight", "bias": "bias"}
    rowwise = False  # acts on each index of the first axis alone (a flattened (B*T, ...) is fine)

    def __init__(self, func: Callable[..., Tensor], name: str) -> None:
        self.func = func
        self.name = name

    # -- parsing -------------------------------------------------------------------------------

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        names = self.names
        if len(args) > len(names) or any(k not in names for k in kwargs):
            return None
        bound = dict(self.defaults)
        bound.update(zip(self.names, args, strict=False))
        bound.update(kwargs)
        if any(n not in bound for n in self.names):
            return None
        return bound

    def parse(self, args: tuple, kwargs: dict, trainable: set[int]) -> OpCall | None:
        """The call, if trainable parameters sit only in this function's parameter slots and the
        data input is a tensor; None otherwise (then the call is handled another way)."""
        bound = self.bind(args, kwargs)
        if bound is None:
            return None
        slots: ClassVar[dict[str, str]] = {}
        for name, value in bound.items():
            if name in self.slots and isinstance(value, Tensor) and id(value) in trainable:
                slots[name] = self.slots[name]
            elif _holds_param(value, trainable):
                return None
            elif name != self.input and isinstance(value, Tensor) and value.requires_grad:
                return None  # another differentiable input: the fused node returns dL/dx only
        x = bound.get(self.input)
        if not slots or not isinstance(x, Tensor) or x.dim() == 0 or not self.accepts(bound):
            return None
        return OpCall(self, bound, slots, self.input)

    def accepts(self, args: dict[str, Any]) -> bool:
        """Whether this call's options keep samples independent along the first axis."""
        return True

    def check(self, call: OpCall) -> None:
        """Refuse, with the fix, a call that is batch-first but still not private."""

    # -- forward and backward of the fused node --------------------------------------------------

    def compute(self, call: OpCall, x: Tensor) -> Tensor:
        """The function's output on data input ``x`` (parameters as constants)."""
        args = dict(call.args)
        args[call.data] = call.as_called(x)
        return self.func(**args)

    def closed_input_grad(self, call: OpCall) -> bool:
        """Whether :meth:`input_grad` gives ``dL/dx`` for this call; otherwise the fused node
        differentiates :meth:`compute` itself (see :mod:`.fused`)."""
        return False

    def input_grad(self, use: Use, g: Tensor) -> Tensor:
        raise NotImplementedError

    def saved_forward(self, call: OpCall, x: Tensor) -> tuple[Tensor, tuple] | None:
        """For a call without :meth:`closed_input_grad`: ``(output, saved)`` from the aten
        forward that autograd records for this function, ``saved`` being what its aten backward
        needs (:meth:`saved_input_grad`); None: the fused node differentiates :meth:`compute`."""
        return None

    def saved_input_grad(self, call: OpCall, saved: tuple, g: Tensor) -> Tensor:
        """``dL/dx`` (as called, in the forward's compute type) from :meth:`saved_forward`."""
        raise NotImplementedError

    # -- per-sample gradients --------------------------------------------------------------------

    def outer(self, use: Use) -> dict[str, Outer] | None:
        return None

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        """``{role: (B, *shape)}``: from the factors, or ``vmap`` of ``grad`` of the function."""
        factors = self.outer(use)
        if factors is not None:
            return {r: f.materialize() for r, f in factors.items()}
        call = use.call
        roles = {slot: role for slot, role in call.slots.items() if role in use.params}
        consts = {slot: use.params[role].detach() for slot, role in roles.items()}

        def loss(p: dict[str, Tensor], xb: Tensor, gb: Tensor) -> Tensor:
            args = dict(call.args)
            args.update(p)
            args[call.data] = xb.unsqueeze(0)
            return (self.func(**args) * gb.unsqueeze(0)).sum()

        out = vmap(grad(loss), in_dims=(None, 0, 0))(consts, call.input, use.grad)
        return {roles[slot]: v for slot, v in out.items()}


def _holds_param(value: Any, trainable: set[int]) -> bool:
    if isinstance(value, Tensor):
        return id(value) in trainable
    if isinstance(value, (list, tuple)):
        return any(_holds_param(v, trainable) for v in value)
    return False


def _flat(t: Tensor) -> Tensor:
    """(B, ..., d) -> (B, T, d) with T the product of the middle axes (T = 1 for (B, d))."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _affine_outer(use: Use, *, weight_is_out_by_in: bool) -> dict[str, Outer]:
    """``y = a W + b`` per token: ``dW_b = sum_t g_bt a_bt^T`` (or its transpose for a weight
    stored (in, out)), ``db_b = sum_t g_bt``."""
    a = _flat(use.call.input)
    g = use.grad.reshape(a.shape[0], a.shape[1], -1)
    out = {}
    if "weight" in use.params:
        out["weight"] = (
            Outer(g, a, g.shape[-1]) if weight_is_out_by_in else Outer(a, g, a.shape[-1])
        )
    if "bias" in use.params:
        out["bias"] = Outer(g, None, g.shape[-1])
    return out


class Linear(OpRule):
    """``y = a W^T + b``; ghost norm ``||dW_b||^2 = sum_{t,s} (a_bt . a_bs)(g_bt . g_bs)``."""

    names = ("input", "weight", "bias")
    defaults: ClassVar[dict[str, Any]] = {"bias": None}
    rowwise = True

    def outer(self, use: Use) -> dict[str, Outer]:
        return _affine_outer(use, weight_is_out_by_in=True)

    def compute(self, call: OpCall, x: Tensor) -> Tensor:
        return F.linear(call.as_called(x), call.args["weight"], call.args["bias"])

    def closed_input_grad(self, call: OpCall) -> bool:
        return True

    def input_grad(self, use: Use, g: Tensor) -> Tensor:
        return g @ use.call.args["weight"].to(g.dtype)


class AddMM(OpRule):
    """``torch.addmm(bias, a, W)`` with ``W`` of shape (in, out) (Hugging Face ``Conv1D``)."""

    names = ("input", "mat1", "mat2", "beta", "alpha")
    defaults: ClassVar[dict[str, Any]] = {"beta": 1, "alpha": 1}
    input = "mat1"
    slots: ClassVar[dict[str, str]] = {"mat2": "weight", "input": "bias"}
    rowwise = True

    def accepts(self, args: dict[str, Any]) -> bool:
        return args["beta"] == 1 and args["alpha"] == 1 and args["mat1"].dim() == 2

    def outer(self, use: Use) -> dict[str, Outer]:
        return _affine_outer(use, weight_is_out_by_in=False)

    def compute(self, call: OpCall, x: Tensor) -> Tensor:
        a = call.args
        return torch.addmm(a["input"], x.reshape(-1, x.shape[-1]), a["mat2"])

    def closed_input_grad(self, call: OpCall) -> bool:
        return True

    def input_grad(self, use: Use, g: Tensor) -> Tensor:
        return g @ use.call.args["mat2"].to(g.dtype).T


class Embedding(OpRule):
    """``y_t = W[id_t]``; ghost norm ``||dW_b||^2 = sum_{t,s} [id_bt = id_bs] (g_bt . g_bs)``."""

    names = (
        "input",
        "weight",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    )
    defaults: ClassVar[dict[str, Any]] = {
        "padding_idx": None,
        "max_norm": None,
        "norm_type": 2.0,
        "scale_grad_by_freq": False,
        "sparse": False,
    }
    slots: ClassVar[dict[str, str]] = {"weight": "weight"}
    rowwise = True

    def check(self, call: OpCall) -> None:
        a = call.args
        if a["max_norm"] is not None:
            raise UnsupportedLayerError(
                "an embedding with max_norm renormalizes, in place and outside the noisy update, "
                "the rows of the tokens in each private batch, so private data would change the "
                "weights without noise. Fix: build the embedding with max_norm=None"
            )
        if a["scale_grad_by_freq"]:
            raise UnsupportedLayerError(
                "an embedding with scale_grad_by_freq=True divides each row's gradient by the "
                "token's count in the whole batch, which couples its samples. Fix: build it with "
                "scale_grad_by_freq=False for private training"
            )
        # sparse=True only changes the layout of the ordinary (batch) gradient, which the fused
        # node never forms: the per-sample rows below are the same, and the update is dense

    def outer(self, use: Use) -> dict[str, Outer]:
        ids = use.call.input
        ids = ids.reshape(ids.shape[0], -1)
        g = _flat(use.grad)
        pad = use.call.args["padding_idx"]
        if pad is not None:
            m = use.params["weight"].shape[0]
            pad = pad if pad >= 0 else pad + m
            g = g * (ids != pad).unsqueeze(-1).to(g.dtype)
        return {"weight": Outer(ids, g, use.params["weight"].shape[0])}

    def compute(self, call: OpCall, x: Tensor) -> Tensor:
        # as called: a flattened (B*C, T) call (multiple choice) gets its (B*C, T, d) output
        return F.embedding(call.as_called(x), call.args["weight"], call.args["padding_idx"])

    def closed_input_grad(self, call: OpCall) -> bool:
        return True  # integer indices: no input gradient


class Conv(OpRule):
    """``conv{1,2,3}d``; with ``groups = 1`` and numeric padding (1-d and 2-d), in closed form
    from unfolded patches ``u``: ``dW_b = sum_l g_bl u_bl^T`` (so ghost norms apply)."""

    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults: ClassVar[dict[str, Any]] = {
        "bias": None,
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
    }

    def __init__(self, func: Callable[..., Tensor], name: str, dims: int) -> None:
        super().__init__(func, name)
        self.dims = dims

    def accepts(self, args: dict[str, Any]) -> bool:
        return args["input"].dim() == self.dims + 2  # unbatched inputs are not batch-first

    def _closed(self, call: OpCall) -> bool:
        return (
            self.dims in (1, 2)
            and call.args["groups"] == 1
            and not isinstance(call.args["padding"], str)
        )

    def _pair(self, v: Any) -> tuple[int, int]:
        v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * self.dims
        return (1, *v) if self.dims == 1 else v  # a 1-d conv is a 2-d conv of height 1

    def outer(self, use: Use) -> dict[str, Outer] | None:
        call = use.call
        if not self._closed(call):
            return None
        a, w = call.args, call.args["weight"]
        x, g = call.input, use.grad
        if self.dims == 1:
            x, g = x.unsqueeze(2), g.unsqueeze(2)
        kernel = w.shape[2:] if self.dims == 2 else (1, w.shape[2])
        u = F.unfold(
            x,
            kernel,
            dilation=self._pair(a["dilation"]),
            padding=(0, *self._pair(a["padding"])[1:])
            if self.dims == 1
            else self._pair(a["padding"]),
            stride=self._pair(a["stride"]),
        )  # (B, C_in k, L)
        g = g.flatten(2).transpose(1, 2)  # (B, L, C_out)
        out = {}
        if "weight" in use.params:
            out["weight"] = Outer(g, u.transpose(1, 2), w.shape[0], shape=tuple(w.shape))
        if "bias" in use.params:
            out["bias"] = Outer(g, None, g.shape[-1])
        return out

    def closed_input_grad(self, call: OpCall) -> bool:
        return not isinstance(call.args["padding"], str)

    def input_grad(self, use: Use, g: Tensor) -> Tensor:
        a = use.call.args
        fn = {
            1: torch.nn.grad.conv1d_input,
            2: torch.nn.grad.conv2d_input,
            3: torch.nn.grad.conv3d_input,
        }
        w = a["weight"]
        return fn[self.dims](
            use.call.input.shape,
            w.to(g.dtype),
            g,
            a["stride"],
            a["padding"],
            a["dilation"],
            a["groups"],
        )


class ConvTranspose(OpRule):
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    defaults: ClassVar[dict[str, Any]] = {
        "bias": None,
        "stride": 1,
        "padding": 0,
        "output_padding": 0,
        "groups": 1,
        "dilation": 1,
    }

    def __init__(self, func: Callable[..., Tensor], name: str, dims: int) -> None:
        super().__init__(func, name)
        self.dims = dims

    def accepts(self, args: dict[str, Any]) -> bool:
        return args["input"].dim() == self.dims + 2

    def saved_forward(self, call: OpCall, x: Tensor) -> tuple[Tensor, tuple]:
        return self.compute(call, x), ()  # the backward needs only the call's arguments

    def saved_input_grad(self, call: OpCall, saved: tuple, g: Tensor) -> Tensor:
        """``convolution_backward`` of the transposed convolution, the call autograd makes
        (``conv_transpose{1,2,3}d`` is ``convolution(..., transposed=True)``), for the input
        only; the input and weight in ``g``'s type are autocast's casts (these convolutions
        run in the lower-precision type), no-ops without autocast."""
        a, d = call.args, self.dims

        def n(v: Any) -> list[int]:
            return list(v) if isinstance(v, (tuple, list)) else [v] * d

        return _CONV_BACKWARD(
            g,
            call.input.to(g.dtype),
            a["weight"].to(g.dtype),
            None,
            n(a["stride"]),
            n(a["padding"]),
            n(a["dilation"]),
            True,
            n(a["output_padding"]),
            a["groups"],
            [True, False, False],
        )[0]


class Norm(OpRule):
    """Elementwise affine normalizations: ``y = w * n(a) + b`` per position, so
    ``dw_b = sum g_b * n(a_b)`` and ``db_b = sum g_b`` over every axis but the parameter's."""

    def normalized(self, call: OpCall) -> Tensor:
        raise NotImplementedError

    def param_axes(self, call: OpCall) -> int:
        """How many trailing axes the parameters span (norm over the last axes)."""
        return len(call.args["normalized_shape"])

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        call, g = use.call, use.grad
        k = self.param_axes(call)
        axes = tuple(range(1, g.dim() - k))
        out = {}
        if "weight" in use.params:
            out["weight"] = (
                (g * self.normalized(call)).sum(axes) if axes else g * self.normalized(call)
            )
        if "bias" in use.params:
            out["bias"] = g.sum(axes) if axes else g
        return out


class LayerNorm(Norm):
    """``layer_norm`` is ``native_layer_norm`` (the aten composite), whose autograd node calls
    ``native_layer_norm_backward`` with the mean and ``1/std`` of the forward: the fused node
    does the same (:meth:`saved_forward`), so ``dL/dx`` is autograd's, bit for bit."""

    rowwise = True
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    defaults: ClassVar[dict[str, Any]] = {"weight": None, "bias": None, "eps": 1e-5}

    def normalized(self, call: OpCall) -> Tensor:
        a = call.args
        return F.layer_norm(call.input, a["normalized_shape"], eps=a["eps"])

    def native(self, x: Tensor, w: Tensor | None, b: Tensor | None, args: dict) -> tuple:
        return torch.native_layer_norm(x, args["normalized_shape"], w, b, args["eps"])

    def probe_args(self) -> tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]:
        return (2, 3, 4), (4,), {"normalized_shape": (4,), "eps": 1e-5}

    def saved_forward(self, call: OpCall, x: Tensor) -> tuple[Tensor, tuple] | None:
        a = call.args
        return _saved_norm_forward(self, call.as_called(x), a["weight"], a["bias"], a)

    def saved_input_grad(self, call: OpCall, saved: tuple, g: Tensor) -> Tensor:
        x, w, b, mean, rstd = _saved_inputs(call, call.as_called(call.input), saved)
        shape = call.args["normalized_shape"]
        shape = [shape] if isinstance(shape, int) else list(shape)
        return _LAYER_NORM_BACKWARD(g, x, shape, mean, rstd, w, b, [True, False, False])[0]


class RMSNorm(Norm):
    rowwise = True
    names = ("input", "normalized_shape", "weight", "eps")
    defaults: ClassVar[dict[str, Any]] = {"weight": None, "eps": None}
    slots: ClassVar[dict[str, str]] = {"weight": "weight"}

    def normalized(self, call: OpCall) -> Tensor:
        a = call.args
        return F.rms_norm(call.input, a["normalized_shape"], eps=a["eps"])


class GroupNorm(Norm):
    """``group_norm`` on (B, C, ...): the affine parameters act per channel."""

    names = ("input", "num_groups", "weight", "bias", "eps")
    defaults: ClassVar[dict[str, Any]] = {"weight": None, "bias": None, "eps": 1e-5}

    def accepts(self, args: dict[str, Any]) -> bool:
        return args["input"].dim() >= 2

    def normalized(self, call: OpCall) -> Tensor:
        return F.group_norm(call.input, call.args["num_groups"], eps=call.args["eps"])

    def native(self, x: Tensor, w: Tensor | None, b: Tensor | None, args: dict) -> tuple:
        """``native_group_norm`` as ``group_norm`` calls it, on an input in the row-major
        layout (:func:`_row_major`; its kernels read raw memory in the layout they assume)."""
        n, c, groups = x.shape[0], x.shape[1], args["num_groups"]
        w, b = (t if t is None else t.contiguous() for t in (w, b))
        return torch.native_group_norm(x, w, b, n, c, math.prod(x.shape[2:]), groups, args["eps"])

    def probe_args(self) -> tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]:
        return (2, 4, 3), (4,), {"num_groups": 2, "eps": 1e-5}

    def saved_forward(self, call: OpCall, x: Tensor) -> tuple[Tensor, tuple] | None:
        """``group_norm`` is ``native_group_norm`` (the aten composite), whose autograd node
        calls ``native_group_norm_backward`` with the forward's statistics (see
        :class:`LayerNorm`).  A call that ``F.group_norm`` refuses before (one value per
        group) keeps the generic path, which raises its error; so does an input not stored
        row-major (channels-last, transposed, expanded: ``group_norm`` and autograd's formula
        pick a memory format per device, see :func:`_row_major`) or on another device than the
        CPU or CUDA."""
        a = call.args
        if x.shape[0] * x.shape[1] // a["num_groups"] * math.prod(x.shape[2:]) == 1:
            return None
        if x.device.type not in ("cpu", "cuda") or not _row_major(x):
            return None
        return _saved_norm_forward(self, x, a["weight"], a["bias"], a)

    def saved_input_grad(self, call: OpCall, saved: tuple, g: Tensor) -> Tensor:
        """Autograd's formula: ``dY`` made row-major like the (row-major) input, since the
        kernel reads ``dY`` as raw row-major memory (an expanded or transposed ``dY``, e.g. the
        gradient of a sum, would otherwise be read out of its bounds)."""
        x, w, _, mean, rstd = _saved_inputs(call, call.input, saved)
        n, c, groups = x.shape[0], x.shape[1], call.args["num_groups"]
        hxw = math.prod(x.shape[2:])
        mask = [True, False, False]
        w = w if w is None else w.contiguous()
        g = g.contiguous()
        return _GROUP_NORM_BACKWARD(g, x, mean, rstd, w, n, c, hxw, groups, mask)[0]

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        g = use.grad
        axes = tuple(range(2, g.dim()))
        out = {}
        if "weight" in use.params:
            n = self.normalized(use.call)
            out["weight"] = (g * n).sum(axes) if axes else g * n
        if "bias" in use.params:
            out["bias"] = g.sum(axes) if axes else g
        return out


class InstanceNorm(OpRule):
    names = (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "use_input_stats",
        "momentum",
        "eps",
    )
    defaults: ClassVar[dict[str, Any]] = {
        "running_mean": None,
        "running_var": None,
        "weight": None,
        "bias": None,
        "use_input_stats": True,
        "momentum": 0.1,
        "eps": 1e-5,
    }

    def accepts(self, args: dict[str, Any]) -> bool:
        return args["input"].dim() >= 3


class PReLU(OpRule):
    names = ("input", "weight")
    slots: ClassVar[dict[str, str]] = {"weight": "weight"}


class EmbeddingBag(OpRule):
    """Only the 2-d form (one bag per row) is batch-first; 1-d input with offsets is not."""

    names = (
        "input",
        "weight",
        "offsets",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "mode",
        "sparse",
        "per_sample_weights",
        "include_last_offset",
        "padding_idx",
    )
    defaults: ClassVar[dict[str, Any]] = {
        "offsets": None,
        "max_norm": None,
        "norm_type": 2,
        "scale_grad_by_freq": False,
        "mode": "mean",
        "sparse": False,
        "per_sample_weights": None,
        "include_last_offset": False,
        "padding_idx": None,
    }
    slots: ClassVar[dict[str, str]] = {"weight": "weight"}

    def accepts(self, args: dict[str, Any]) -> bool:
        return args["input"].dim() == 2 and args["offsets"] is None

    def check(self, call: OpCall) -> None:
        a = call.args
        if a["max_norm"] is not None or a["scale_grad_by_freq"] or a["sparse"]:
            raise UnsupportedLayerError(
                "an embedding bag with max_norm, scale_grad_by_freq or sparse couples samples or "
                "changes weights outside the noisy update. Fix: build it with the defaults"
            )


class Elementwise(OpRule):
    """``x * w``, ``x + a w``, ``x - w`` (either order) with ``w`` broadcast over ``x`` and not
    over its batch axis (a scale or shift per feature: Llama's RMSNorm weight, layer scales):
    ``dw_b`` is ``g_b * x_b`` (or ``+-a g_b``) summed over the axes ``w`` is broadcast along.
    ``w`` may carry leading axes of length 1, its first aligned with the batch axis (a (1, d)
    weight against (B, d)): aligned to ``x`` as ``(1, ..., 1, *w.shape)``, sample ``b``'s
    gradient is ``g_b x_b`` summed to that shape, with the batch axis kept."""

    names = ("input", "other", "alpha")
    defaults: ClassVar[dict[str, Any]] = {"alpha": 1}
    slots: ClassVar[dict[str, str]] = {"input": "weight", "other": "weight"}
    rowwise = True

    def __init__(self, func: Callable[..., Tensor], name: str, kind: str) -> None:
        super().__init__(func, name)
        self.kind = kind

    def parse(self, args: tuple, kwargs: dict, trainable: set[int]) -> OpCall | None:
        bound = self.bind(args, kwargs)
        if bound is None or (self.kind == "mul" and "alpha" in kwargs):
            return None
        a, b = bound["input"], bound["other"]
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return None
        pa, pb = id(a) in trainable, id(b) in trainable
        if pa == pb or _holds_param(bound["alpha"], trainable):
            return None
        w, x = (a, b) if pa else (b, a)
        if x.dim() == 0 or w.dim() > x.dim() or (w.dim() == x.dim() and w.shape[0] != 1):
            return None  # the weight would span the batch axis
        if torch.broadcast_shapes(w.shape, x.shape) != x.shape:
            return None
        return OpCall(
            self, bound, {"input" if pa else "other": "weight"}, "other" if pa else "input"
        )

    def compute(self, call: OpCall, x: Tensor) -> Tensor:
        a = dict(call.args)
        a[call.data] = call.as_called(x)
        if self.kind == "mul":
            return torch.mul(a["input"], a["other"])
        return self.func(a["input"], a["other"], alpha=a["alpha"])

    def _scale(self, call: OpCall) -> tuple[float, float]:
        """``(dy/dw scale, dy/dx scale)`` for add and sub."""
        alpha = call.args["alpha"]
        w_first = call.data == "other"
        if self.kind == "add":
            return (1.0, alpha) if w_first else (alpha, 1.0)
        return (1.0, -alpha) if w_first else (-alpha, 1.0)

    def closed_input_grad(self, call: OpCall) -> bool:
        return True

    def input_grad(self, use: Use, g: Tensor) -> Tensor:
        call = use.call
        x = call.input
        if self.kind == "mul":
            w = call.args["input" if call.data == "other" else "other"]
            gx = g * w.to(g.dtype)
        else:
            gx = g * self._scale(call)[1]
        return gx.sum_to_size(call.as_called(x).shape)  # g is as called (maybe (B*T, ...))

    def per_sample(self, use: Use) -> dict[str, Tensor]:
        call, g = use.call, use.grad
        w = use.params["weight"]
        full = g * call.input.to(g.dtype) if self.kind == "mul" else g * self._scale(call)[0]
        b = full.shape[0]
        # w as broadcast against the (batch-first) input: its axis 0 is 1 (parse refuses a
        # weight spanning the batch axis), so keeping axis 0 at b sums each sample alone
        aligned = (1,) * (full.dim() - w.dim()) + tuple(w.shape)
        if aligned[0] != 1:
            raise UnsupportedLayerError(
                f"'{use.name}': a weight of shape {tuple(w.shape)} spans the batch axis of an "
                f"input of shape {tuple(full.shape)}. Fix: give the weight fewer axes than the input"
            )
        return {"weight": full.sum_to_size((b, *aligned[1:])).reshape(b, *w.shape)}


_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_LAYER_NORM_BACKWARD = torch.ops.aten.native_layer_norm_backward.default
_GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default

# (rule, device type, autocast dtype, input and parameter dtypes) -> whether autocast casts the
# call's inputs to float32 (or None: unknown), see _autocast_casts
_AUTOCAST_CASTS: dict[tuple, bool | None] = {}


def _to_float32(t: Tensor | None, device_type: str) -> Tensor | None:
    """What autocast's float32 policy makes of an argument: a floating-point tensor on the
    autocast device, other than float64, cast to float32; anything else unchanged."""
    if (
        isinstance(t, Tensor)
        and t.is_floating_point()
        and t.dtype not in (torch.float32, torch.float64)
        and t.device.type == device_type
    ):
        return t.to(torch.float32)
    return t


def _autocast_casts(rule: Any, x: Tensor, w: Tensor | None, b: Tensor | None) -> bool | None:
    """Whether autocast, as set now for ``x``'s device, runs ``rule``'s function on float32
    casts of its inputs (True: CUDA autocast's float32 list names layer_norm and group_norm)
    or on the inputs as they are (False: no autocast; CPU autocast leaves these norms alone, as
    tested); None when this cannot be told (a device type autocast does not know, or a
    reading that matches neither): the fused node then keeps the generic path.

    Not taken from a table: the first call for each device type, autocast type and argument
    types runs the function itself under the current autocast on tiny tensors of those types
    (public values from a fixed-seed generator of their own) and keeps the reading whose
    output, computed with autocast off, is the same in type and bits."""
    device = x.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return False
        key = (
            rule.name,
            device,
            torch.get_autocast_dtype(device),
            x.dtype,
            None if w is None else w.dtype,
            None if b is None else b.dtype,
        )
    except (RuntimeError, TypeError, AttributeError):
        return None
    if key not in _AUTOCAST_CASTS:
        _AUTOCAST_CASTS[key] = _probe_autocast(rule, x, w, b)
    return _AUTOCAST_CASTS[key]


def _probe_autocast(rule: Any, x: Tensor, w: Tensor | None, b: Tensor | None) -> bool | None:
    x_shape, p_shape, args = rule.probe_args()
    gen = torch.Generator().manual_seed(0)

    def tiny(like: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
        if like is None:
            return None
        t = torch.randn(shape, generator=gen, dtype=torch.float64, device="cpu")  # gen: CPU
        return t.to(device=like.device, dtype=like.dtype)

    tx, tw, tb = tiny(x, x_shape), tiny(w, p_shape), tiny(b, p_shape)
    real = rule.func(tx, **{"weight": tw, "bias": tb, **args})
    device = x.device.type
    with torch.autocast(device, enabled=False):
        for cast in (True, False):
            ins = [_to_float32(t, device) if cast else t for t in (tx, tw, tb)]
            out = rule.native(*ins, args)[0]
            if out.dtype == real.dtype and torch.equal(out, real):
                return cast
    return None


def _row_major(t: Tensor) -> bool:
    """Whether ``t`` has exactly the strides of a fresh row-major tensor of its shape (size-1
    axes included, which ``is_contiguous`` ignores): then every memory-format heuristic of
    torch (``suggest_memory_format``) reads it as row-major, and ``contiguous()`` is a no-op."""
    stride, expect = t.stride(), 1
    for i in reversed(range(t.dim())):
        if stride[i] != expect:
            return False
        expect *= t.shape[i]
    return True


def _saved_norm_forward(
    rule: Any, x: Tensor, w: Tensor | None, b: Tensor | None, args: dict
) -> tuple[Tensor, tuple] | None:
    """The norm's aten forward on ``x`` with autocast's casts (:func:`_autocast_casts`):
    ``(y, (cast, mean, rstd))``.  The inputs are not kept: the call holds them, and their
    float32 casts (exact from 16 bits) are made again in the backward, so the node holds two
    statistics per normalized group (the inner graph held a float32 copy of ``x``)."""
    cast = _autocast_casts(rule, x, w, b)
    if cast is None:
        return None
    if cast:
        device = x.device.type
        x, w, b = (_to_float32(t, device) for t in (x, w, b))
    y, mean, rstd = rule.native(x, w, b, args)
    return y, (cast, mean, rstd)


def _saved_inputs(call: OpCall, x: Tensor, saved: tuple) -> tuple:
    """``(x, weight, bias, mean, rstd)`` as the forward's kernel saw them (cast again)."""
    cast, mean, rstd = saved
    w, b = call.args.get("weight"), call.args.get("bias")
    if cast:
        device = x.device.type
        x, w, b = (_to_float32(t, device) for t in (x, w, b))
    return x, w, b, mean, rstd


OPS: dict[Any, OpRule] = {}


def register_op(func: Any, rule: OpRule) -> None:
    """Make ``rule`` the per-sample rule of calls of ``func`` (a torch function)."""
    OPS[func] = rule


for _func, _rule in [
    (F.linear, Linear(F.linear, "linear")),
    (torch.addmm, AddMM(torch.addmm, "addmm")),
    (F.embedding, Embedding(F.embedding, "embedding")),
    (torch.conv1d, Conv(torch.conv1d, "conv1d", 1)),
    (torch.conv2d, Conv(torch.conv2d, "conv2d", 2)),
    (torch.conv3d, Conv(torch.conv3d, "conv3d", 3)),
    (torch.conv_transpose1d, ConvTranspose(torch.conv_transpose1d, "conv_transpose1d", 1)),
    (torch.conv_transpose2d, ConvTranspose(torch.conv_transpose2d, "conv_transpose2d", 2)),
    (torch.conv_transpose3d, ConvTranspose(torch.conv_transpose3d, "conv_transpose3d", 3)),
    (F.layer_norm, LayerNorm(F.layer_norm, "layer_norm")),
    (F.rms_norm, RMSNorm(F.rms_norm, "rms_norm")),
    (F.group_norm, GroupNorm(F.group_norm, "group_norm")),
    (F.instance_norm, InstanceNorm(F.instance_norm, "instance_norm")),
    (torch.prelu, PReLU(torch.prelu, "prelu")),
    (F.embedding_bag, EmbeddingBag(F.embedding_bag, "embedding_bag")),
    (torch.mul, Elementwise(torch.mul, "mul", "mul")),
    (torch.Tensor.mul, Elementwise(torch.mul, "mul", "mul")),
    (torch.add, Elementwise(torch.add, "add", "add")),
    (torch.Tensor.add, Elementwise(torch.add, "add", "add")),
    (torch.sub, Elementwise(torch.sub, "sub", "sub")),
    (torch.Tensor.sub, Elementwise(torch.sub, "sub", "sub")),
]:
    register_op(_func, _rule)


# Functions whose output for one sample depends on the others while in this mode.
def mixes_samples(func: Any, args: tuple, kwargs: dict) -> str | None:
    """A description of the mixing if this call normalizes over the batch, else None."""
    if func in (F.batch_norm, torch.batch_norm):
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
        if training:
            return "batch normalization with batch statistics (a BatchNorm layer in train mode)"
    return None
