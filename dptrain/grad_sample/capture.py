"""Record every use of every trainable parameter, with the gradient that reaches it.

The capture never replaces a module's ``forward``.  Modules that own trainable parameters
(and module classes registered with :func:`register_scope`, e.g. ``peft``'s LoRA layers, whose
forward uses their children's parameters directly) get a forward pre-hook and a forward hook;
while such a call runs, a ``TorchFunctionMode`` sees every torch function called inside it.  A
call of a function whose arguments include a trainable parameter is routed as the plan says
(:mod:`.plan`):

* **fuse**: through a :class:`~.fused.Fused` node that records the call and its output gradient
  (:mod:`.ops`);
* **local**: with the parameters replaced by :class:`~.fused.Alias` nodes, and the enclosing
  module call recorded with its inputs and output gradients, to be re-run per sample
  (:mod:`.local`); uses of the same parameters recorded inside that call are superseded by it;
* **direct**: unchanged: autograd reaches the parameter itself, and the per-sample gradients of
  these parameters are the Jacobian rows of the per-sample losses (one vectorized backward).

A hook on every trainable parameter sees any gradient that reaches it directly: for a parameter
the plan does not differentiate directly, that means a use the plan did not foresee, and the
chunk is probed again and redone before anything is released.  So every gradient path into
every trainable parameter is accounted for exactly once.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .. import rng
from ..batching import batch_cat, batch_flip, batch_len, batch_slice
from .fused import Alias, Fused
from .local import LocalCall, LocalRule, replays_exactly
from .ops import OPS, OpCall, UnsupportedLayerError, Use, mixes_samples
from .plan import (
    INVALID,
    ROOT,
    Decision,
    OpRecord,
    Plan,
    ProbeLog,
    ScopeKey,
    ScopeRecord,
    build_plan,
    row_counts,
    sample_axis,
    sample_prints,
)
from .watch import DataWatch, fingerprint

_SCOPES: list[type] = []
_LOCAL = LocalRule()


def register_scope(cls: type) -> None:
    """Hook ``cls``'s calls even when it owns no trainable parameter itself (its forward uses
    its children's parameters without calling them)."""
    _SCOPES.append(cls)


try:  # peft is a dependency, but keep the engine importable without it
    from peft.tuners.lora.layer import LoraLayer

    register_scope(LoraLayer)
except ImportError:  # pragma: no cover
    pass


class PlanMiss(RuntimeError):
    """The forward pass did something the plan did not foresee; probe again."""


_META_ATTRS = {
    "shape", "dtype", "device", "requires_grad", "is_cuda", "ndim", "layout", "is_leaf",
    "grad_fn", "grad", "data", "_version", "names", "is_sparse", "is_quantized", "is_meta",
}  # fmt: skip
_META_FUNCS = {
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.is_floating_point,
    torch.Tensor.is_contiguous, torch.Tensor.element_size, torch.Tensor.data_ptr,
    torch.Tensor.stride, torch.Tensor.storage_offset, torch.Tensor.is_complex,
    torch.Tensor.__len__, torch.Tensor.__hash__, torch.Tensor.__eq__, torch.Tensor.nelement,
    torch.Tensor.detach, torch.Tensor.get_device, torch.is_floating_point, torch.numel,
}  # fmt: skip
_DROPOUT = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
_DROPOUT_RAW = {
    torch.dropout,
    torch.alpha_dropout,
    torch.feature_alpha_dropout,
    torch.feature_dropout,
}
_RANDOM_NAMES = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "normal",
    "poisson", "multinomial", "randperm", "bernoulli_", "uniform_", "normal_", "exponential_",
    "random_", "cauchy_", "geometric_", "log_normal_",
}  # fmt: skip


def _is_meta(func: Any) -> bool:
    if func in _META_FUNCS:
        return True
    if getattr(func, "__name__", "") == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "") in _META_ATTRS
    return False


@dataclass
class _Call:
    """One call of a hooked module while it runs."""

    module: nn.Module | None
    name: str
    key: ScopeKey
    leaves: list[Any]
    spec: Any
    start: int
    ops: int = 0
    random: bool = False
    aliased: bool = False
    prints: list[dict[int, Tensor]] | None = None  # probes: the inputs' sample fingerprints
    state: dict[str, int] | None = None  # probes: ids of the module's tensor attributes
    held: list[Any] | None = None  # probes: the tensors held by its non-tensor arguments


class _Mode(TorchFunctionMode):
    def __init__(self, capture: GradCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.capture._intercept(func, args, kwargs or {})


@dataclass
class Recorded:
    """One chunk's recorded uses (superseded roles removed) and the per-sample gradients of the
    directly differentiated parameters."""

    uses: list[Use]
    direct: dict[nn.Parameter, Tensor]
    batch_size: int


class GradCapture:
    """Records, for one chunk at a time, every use of the model's trainable parameters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {id(p): p for p in model.parameters() if p.requires_grad}
        self.param_names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self.scopes: list[tuple[str, nn.Module]] = []
        for name, m in model.named_modules():
            own = any(p.requires_grad for p in m.parameters(recurse=False))
            if own or isinstance(m, tuple(_SCOPES)):
                self.scopes.append((name, m))
        self._scope_names = {id(m): n for n, m in self.scopes}
        self.plan: Plan | None = None
        self.active = False  # routing calls of this chunk's forward and backward
        self.replaying = False  # extra backward passes: fused nodes record nothing
        self.in_backward = False
        self.batch_size = 0
        self._row_counts: dict = {}  # the step's batch sizes (plan.row_counts)
        self.uses: list[Use] = []
        self._locals: list[tuple[Use, int, int]] = []
        self._counts: dict[int, int] = {}
        self._probe: ProbeLog | None = None
        self._unplanned: set[str] = set()
        # parameters a step saw get a gradient the plan did not route (a use invisible to the
        # probe): differentiated directly from the next plan on
        self._force_direct: set[int] = set()
        self._tls = threading.local()
        self._all_names = {id(m): n or "<model>" for n, m in model.named_modules()}
        self._modules = [m for _, m in model.named_modules()]
        self._rewritten: set[str] = set()  # parameters the forward writes without changing
        self._rng: Tensor | None = None  # while probing: the CPU generator's state at the start
        # while probing (from run()): Python's and NumPy's global generator states at the start
        self._host_rng: tuple | None = None
        self._failed_at: str | None = None  # the layer where the last probe forward raised
        # (pad, L): ``pad(batch, n)`` pads the batch's samples to ``n`` positions (None: to
        # their longest), L the public bound on a sample's positions; the padding probe
        # (:meth:`_check_padding`) runs only with it (``PrivacyEngine(max_length=L, pad=pad)``)
        self.padding: tuple[Callable[[Any, int | None], Any], int] | None = None
        self._mode = _Mode(self)
        self._watch = DataWatch(model)
        self._handles: list[Any] = []

    # -- hooks ---------------------------------------------------------------------------------

    def attach(self) -> None:
        if self._handles:
            return
        for _, m in self.scopes:
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(
                m.register_forward_hook(self._post, with_kwargs=True, always_call=True)
            )
        for p in self.params.values():
            self._handles.append(p.register_hook(self._make_param_hook(p)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.uses.clear()

    def _make_param_hook(self, p: nn.Parameter) -> Callable[[Tensor], None]:
        pid = id(p)

        def hook(g: Tensor | None) -> None:
            plan = self.plan
            if g is None or not self.active or self.replaying:
                return
            if plan is None or pid not in plan.direct:
                self._unplanned.add(self.param_names[pid])
                self._force_direct.add(pid)

        return hook

    @property
    def _stack(self) -> list[_Call]:
        if not hasattr(self._tls, "stack"):
            self._tls.stack = []
            self._tls.entered = False
        return self._tls.stack

    @property
    def _recording(self) -> bool:
        # calls under no_grad too: they are counted as the probe counts them, so the positions
        # of the uses after them (and of later calls of the same module) stay the planned ones
        return self._probe is not None or self.active

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording:
            return
        stack = self._stack
        if not stack and not self._tls.entered:
            self._mode.__enter__()
            self._tls.entered = True
        k = self._counts.get(id(module), 0)
        self._counts[id(module)] = k + 1
        if self._probe is None and (self.in_backward or self.replaying) and self.plan is not None:
            # a recomputation (activation checkpointing) may run a segment more than once:
            # its calls replay the planned forward's calls of this module in order
            k %= self.plan.calls.get(id(module), 1)
        key = (id(module), k)
        plan = self.plan
        if self._probe is not None or plan is None or key in plan.scopes:
            leaves, spec = tree_flatten((args, kwargs))
        else:  # only a planned re-run (``_record_local``) or a probe reads a call's inputs
            leaves, spec = [], None
        name = self._scope_names.get(id(module), type(module).__name__)
        call = _Call(module, name, key, leaves, spec, len(self.uses))
        if self._probe is not None:  # before the call can change its inputs in place
            call.prints = [sample_prints(x, self._probe.batch_size) for x in leaves]
            call.state = _tensor_attrs(module)
            call.held = _held_state(leaves)
        stack.append(call)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        stack = self._stack
        if not stack or stack[-1].module is not module:
            return
        call = stack.pop()
        try:
            if self._probe is not None:
                self._log_scope(call, output)
            elif call.aliased:
                return self._record_local(call, output)
        finally:
            if not stack and self._tls.entered:
                self._tls.entered = False
                self._mode.__exit__(None, None, None)

    # -- the mode ------------------------------------------------------------------------------

    def _intercept(self, func: Any, args: tuple, kwargs: dict) -> Any:
        stack = getattr(self._tls, "stack", None)  # (``_stack`` without creating it)
        if not stack or not (self._probe is not None or self.active):  # ``_recording``
            return func(*args, **kwargs)
        if self._probe is not None:
            try:
                return self._probe_call(stack, func, args, kwargs)
            except Exception:
                if self._failed_at is None:  # the innermost layer, before hooks unwind it
                    self._failed_at = self._where()
                raise
        if _is_meta(func):
            return func(*args, **kwargs)
        touched = self._touched(args, kwargs)
        if not touched:
            return func(*args, **kwargs)
        if not torch.is_grad_enabled():  # no gradient flows from it: counted, not routed
            stack[-1].ops += 1
            return func(*args, **kwargs)
        return self._route(stack[-1], func, args, kwargs, touched)

    def _touched(self, args: tuple, kwargs: dict) -> list[nn.Parameter]:
        """The trainable parameters among the arguments (also inside lists and tuples), each
        once, in order of first appearance."""
        found: dict[int, nn.Parameter] = {}
        _collect(args, self.params, found)
        if kwargs:
            _collect(kwargs.values(), self.params, found)
        return list(found.values())

    def _route(self, call: _Call, func: Any, args: tuple, kwargs: dict, touched: list) -> Any:
        key = (call.key, call.ops)
        call.ops += 1
        decision = self.plan.ops.get(key) if self.plan is not None else None
        if decision is not None and not self._fits(call, decision, func, touched):
            decision = None
        if decision is None:
            if self.in_backward:  # a recomputation (checkpointing) beyond the planned forward
                return func(*args, **kwargs)
            raise PlanMiss(f"an unplanned use of {self._names(touched)} in '{call.name}'")
        if decision.kind == "fuse":
            return self._fuse(call, decision, func, args, kwargs)
        if decision.kind == "local":
            call.aliased = True
            ids = {id(p) for p in touched}

            def alias(v: Any) -> Any:
                if isinstance(v, Tensor) and id(v) in ids:
                    return Alias.apply(v)
                if isinstance(v, (list, tuple)) and any(
                    id(x) in ids for x in v if isinstance(x, Tensor)
                ):
                    return type(v)(alias(x) for x in v)
                return v

            return func(*[alias(a) for a in args], **{k: alias(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)

    def _fits(self, call: _Call, d: Decision, func: Any, touched: list) -> bool:
        """Whether the planned decision at this position fits the call made there: a fused rule
        computes its own function, so the function must be the probed one (a branch the probe
        took and this batch does not shifts the positions after it); a re-run module call
        covers only the parameters it adopted (an alias of a directly differentiated one would
        cut its gradient).  A direct decision fits any call: the parameters' hooks see the
        rest."""
        if d.kind == "fuse":
            return d.func is None or d.func is func
        if d.kind == "local":
            spec = self.plan.scopes.get(call.key)
            return spec is not None and all(id(p) in spec.names for p in touched)
        return True

    def _fuse(self, call: _Call, d: Decision, func: Any, args: tuple, kwargs: dict) -> Tensor:
        op = d.rule.parse(args, kwargs, self.params)
        if op is None:
            raise PlanMiss(f"'{call.name}' called {d.rule.name} differently than planned")
        d.rule.check(op)
        x = op.input
        if d.rows:  # a (B*T, ...) input, sample-major (observed in the probes), T the size of
            # the batch's tensors it was then, now too (rows gathered without padding re-plan)
            per_sample = self._row_counts.get(d.rows_from) if d.rows_from else None
            if per_sample is None or x.shape[0] != self.batch_size * per_sample:
                raise PlanMiss(
                    f"'{call.name}': {x.shape[0]} rows for {self.batch_size} samples of "
                    f"{per_sample} each"
                )
            op.view_shape = tuple(x.shape)
            x = x.reshape(self.batch_size, -1, *x.shape[1:])
        elif d.expand:
            x = x.expand(self.batch_size, *x.shape[1:])
        if x.shape[0] != self.batch_size:
            raise PlanMiss(f"'{call.name}': {d.rule.name} sees a first axis of {x.shape[0]}")
        op.args[op.data] = x.detach()
        params = {role: op.args[slot] for slot, role in op.slots.items()}
        use = Use(d.rule, f"{call.name}:{d.rule.name}", op, params, seq=len(self.uses))
        self.uses.append(use)
        try:
            return Fused.apply(self, use, x, *params.values())
        except TypeError as err:  # inside an operator a TypeError would become NotImplemented
            raise RuntimeError(f"'{call.name}': {d.rule.name} failed: {err}") from err

    def _record_local(self, call: _Call, output: Any) -> Any:
        """Record the call to be re-run per sample; return its output with every differentiable
        leaf replaced by a copy, whose gradient is then exactly what the caller sends back.  The
        raw leaf would not do: one that also feeds another output (an LSTM cell's ``c`` feeding
        ``h``) hands its hook the internal path too, and a hook on a view is lost when the
        caller modifies it in place (Falcon's ``mlp_output += attention_output``)."""
        spec = self.plan.scopes.get(call.key) if self.plan is not None else None
        if spec is None:
            if self.in_backward:
                return None
            raise PlanMiss(f"'{call.name}' was re-routed per sample without a plan")
        out_leaves, out_spec = tree_flatten(output)
        out_leaves = [
            t.clone() if isinstance(t, Tensor) and t.requires_grad else t for t in out_leaves
        ]
        leaves = [x.detach() if isinstance(x, Tensor) else x for x in call.leaves]
        local = LocalCall(call.module, leaves, call.spec, spec.in_axes, spec.out_axes)
        params = {name: self.params[pid] for pid, name in spec.names.items()}
        use = Use(_LOCAL, call.name, local, params, seq=len(self.uses))
        use.grad = [None] * len(out_leaves)
        use.cache["adopted"] = frozenset(spec.names)
        for i, t in enumerate(out_leaves):
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(self._make_out_hook(use, i))
        self._locals.append((use, call.start, len(self.uses)))
        self.uses.append(use)
        return tree_unflatten(out_leaves, out_spec)

    def _make_out_hook(self, use: Use, i: int) -> Callable[[Tensor], None]:
        def hook(g: Tensor) -> None:
            if not self.replaying:
                use.grad[i] = g.detach() if use.grad[i] is None else use.grad[i] + g.detach()

        return hook

    # -- probing -------------------------------------------------------------------------------

    def _probe_call(self, stack: list[_Call], func: Any, args: tuple, kwargs: dict) -> Any:
        log = self._probe
        name = getattr(func, "__name__", "")
        if func in _DROPOUT or func in _DROPOUT_RAW or func is F.scaled_dot_product_attention:
            # switched off, then recorded like any call: a parameter may be its argument (a
            # learned attention bias as attn_mask, dropout on a weight), and the step routes it
            args, kwargs, drew = _without_dropout(func, args, kwargs)
            if drew:
                for c in stack:
                    c.random = True
        elif name in _RANDOM_NAMES:
            log.random = True
            for c in stack:
                c.random = True
        mixing = mixes_samples(func, args, kwargs)
        if mixing is not None:
            log.mixing.append(f"layer {self._where()}: {mixing}")
        if _is_meta(func):
            return func(*args, **kwargs)
        touched = self._touched(args, kwargs)
        if not touched:
            return func(*args, **kwargs)
        call = stack[-1]
        key = (call.key, call.ops)
        call.ops += 1
        rule = OPS.get(func)
        # inside torch.vmap / torch.func (the model's own) the data is a functorch wrapper: a
        # rule's per-sample rows would be the transform's, not the batch's; differentiated
        # directly (or by re-running the module) instead
        transformed = _transformed(args, kwargs)
        if transformed:
            for c in stack:  # nor re-run: the per-sample alias cannot enter the transform
                c.random = True
        op = rule.parse(args, kwargs, self.params) if rule and not transformed else None
        rec = OpRecord(key, func, frozenset(id(p) for p in touched), rule if op else None)
        if op is not None:
            try:
                rule.check(op)
            except UnsupportedLayerError as err:
                # the model's own forward code (a functional call) has no name: say its class
                where = f"'{call.name}'"
                if not call.name and call.module is not None:
                    where = f"'<model>' ({type(call.module).__name__})"
                raise UnsupportedLayerError(f"layer {where}: {err}") from None
            x = op.input
            rec.input_shape = tuple(x.shape)
            n, b = x.shape[0], log.batch_size
            rec.samples = sample_prints(x, b, (0,))
            if rule.rowwise and n != b and n % b == 0:
                rows = x.detach().reshape(b, -1).double()
                rec.rows = torch.stack([rows.sum(1), rows.square().sum(1)], 1)
        log.ops[key] = rec
        out = func(*args, **kwargs)
        if key in log.expand and isinstance(out, Tensor) and out.shape[:1] == (1,):
            out = out.expand(log.batch_size, *out.shape[1:])
            if log.taps is not None and out.is_floating_point():
                tap = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
                log.taps.append(tap.requires_grad_())
                out = out + tap
        return out

    def _where(self) -> str:
        """The innermost module running now, as ``'name' (Class)`` (probes only)."""
        path = getattr(self._tls, "modules", None)
        if not path:
            return "the loss function"
        m = path[-1]
        return f"'{self._all_names.get(id(m), '?')}' ({type(m).__name__})"

    def _log_scope(self, call: _Call, output: Any) -> None:
        outs = tree_flatten(output)[0]
        rec = ScopeRecord(
            call.key,
            call.module,
            [tuple(x.shape) if isinstance(x, Tensor) else None for x in call.leaves],
            [tuple(x.shape) if isinstance(x, Tensor) else None for x in outs],
            [isinstance(x, Tensor) and x.is_floating_point() for x in outs],
            call.random
            or not replays_exactly(call.module)
            # a forward that keeps tensors on its module (a recurrent state of the last batch)
            # cannot be re-run on one sample after the batch's call
            or (call.state is not None and _tensor_attrs(call.module) != call.state)
            # nor one that updates an object it was handed (transformers' key/value or Mamba
            # cache, ``past_key_values``): a re-run would read, and extend, the updated state
            or (call.held is not None and _held_state(call.leaves) != call.held),
            call.prints or [],
            [sample_prints(x, self._probe.batch_size) for x in outs],
        )
        self._probe.scopes[call.key] = rec

    def _probe_forward(
        self,
        loss_fn: Callable,
        batch: Any,
        expand: frozenset = frozenset(),
        outputs: list | None = None,
        graph: bool = False,
        state_error: Callable[[list[str]], UnsupportedLayerError] | None = None,
        taps: list[Tensor] | None = None,
    ) -> tuple[ProbeLog, Tensor]:
        """One recorded forward of ``batch``; the per-sample losses, detached unless ``graph``.
        Buffers the forward changed are put back and refused, by ``state_error(names)`` where
        given (the padding probe), else by :func:`_buffers_error`.  ``taps``: a list to collect
        the broadcast outputs' addends in (:meth:`_rows_own`)."""
        b = batch_len(batch)
        log = ProbeLog(b, row_counts(tree_flatten(batch)[0], b), expand=expand, taps=taps)
        if self._rng is not None:
            torch.set_rng_state(self._rng)
        if self._host_rng is not None:  # every probe draws the same host random numbers too
            rng.set_host_state(self._host_rng)
        saved = _snapshot_buffers(self.model)
        attrs = _snapshot_attrs(self.model)
        weights = _param_state(self.model)
        self._probe, self._counts = log, {}
        self._failed_at = None
        self._stack.clear()
        self._stack.append(_Call(None, "the loss function", ROOT, [], None, 0))
        self._tls.entered = True
        self._tls.modules = []
        hooks = _module_tracking(self._tls.modules, outputs)
        try:
            with self._mode, torch.enable_grad():  # the real step's code path (requires_grad)
                losses = _per_sample_losses(loss_fn(self.model, batch), log.batch_size)
        finally:
            for h in hooks:
                h.remove()
            changed = _restore_buffers(self.model, saved)  # a probe changes no state
            _restore_attrs(self.model, attrs)
            self._probe = None
            self._stack.clear()
            self._tls.entered = False
            self._tls.modules = []
        if self._host_rng is not None and rng.host_state() != self._host_rng:
            # NumPy's or Python's generator drawn (wav2vec2's SpecAugment masks): random, and
            # no module call is re-run per sample (a re-run would draw other numbers)
            log.random = True
            for rec in log.scopes.values():
                rec.random = True
        if log.mixing:
            raise UnsupportedLayerError(
                f"{log.mixing[0]} mixes the samples of a batch, so per-sample gradients do not "
                "exist (and BatchNorm's statistics would come from private data without noise). "
                "Fix: replace it with GroupNorm or LayerNorm, or put it in eval mode with frozen "
                "statistics (model.eval() on those layers; statistics from pre-training)"
            )
        if changed:
            raise (state_error or partial(_buffers_error, self.model))(changed)
        after = _param_state(self.model)
        moved = [n for n, v in after.items() if not _same(weights[n][1:], v[1:])]
        if moved:
            raise _moved_error(moved)
        # written but unchanged (peft merges a LoRA delta into a parameter and takes it out):
        # checked by value at every step, the others by their version counters
        self._rewritten |= {n for n, v in after.items() if v[0] != weights[n][0]}
        return log, losses if graph else losses.detach()

    def _rows_own(self, loss_fn: Callable, batch: Any, expand: frozenset) -> bool:
        """Whether broadcasting the uses ``expand`` (a ``(1, ...)`` input taken as shared by the
        batch, its output expanded to ``B`` rows, row ``b`` credited to sample ``b``) is sound:
        row ``b`` of each broadcast output must reach sample ``b``'s loss only.  Equal losses do
        not show it: a ``(1, ...)`` input may be one sample's rows (``nn.AdaptiveLogSoftmaxWith
        Loss`` runs a tail cluster on the rows whose targets fall in it, one row at B = 3 and at
        B + 1), and a later ``gather`` with a ``(1, 1)`` index reads row 0 of the broadcast
        output only, so that sample's gradient went to sample 0.

        One forward with a zero ``(B, ...)`` addend on each broadcast output, two backward
        passes: of ``sum_j l_j`` and of ``sum_j w_j l_j`` (``w`` of :func:`_probe_weights`).
        With every row its own sample's, the second addend gradient is the first's with row
        ``b`` scaled by ``w_b`` (within :func:`_grad_tol` of its norm); a row reaching other
        samples' losses mixes their weights.  A failed backward counts as unsound (the uses are
        then not broadcast, which is exact)."""
        if not expand:
            return True
        params = list(self.params.values())
        kept = [p.grad for p in params]
        taps: list[Tensor] = []
        grads: list[list[Tensor | None]] = []
        try:
            _, losses = self._probe_forward(loss_fn, batch, expand, graph=True, taps=taps)
            if not taps or not losses.requires_grad:
                return True
            w = _probe_weights(batch_len(batch)).to(losses.device, losses.dtype)
            for weights in (torch.ones_like(w), w):
                for t in taps:
                    t.grad = None
                self.replaying = True  # the parameter hooks of a step ignore these passes
                try:
                    (losses * weights).sum().backward(retain_graph=True)
                except RuntimeError:
                    return False
                finally:
                    self.replaying = False
                grads.append([t.grad for t in taps])
        finally:
            for p, g in zip(params, kept, strict=True):
                p.grad = g
        tol = _grad_tol(params)
        for g1, gw in zip(*grads, strict=True):
            if g1 is None or gw is None:
                continue  # this output reaches no loss
            scaled = g1 * w.view(-1, *([1] * (g1.dim() - 1)))
            if not float((gw - scaled).norm()) <= tol * float(gw.norm()):
                return False  # also non-finite: not broadcast
        return True

    def _check_parts(
        self, loss_fn: Callable, batch: Any, expand: frozenset, losses: Tensor
    ) -> None:
        """Samples leaving (``B >= 2``): the losses of ``R = batch[1:]`` reversed and of
        ``batch[:1]`` must be those of the same samples in ``batch`` (``losses``): ``R`` sees a
        statistic its first sample decided, ``[:1]`` one that any other sample decided (a
        maximum is one sample's, so one of the two sees it); reversed, every sample of ``R``
        but its middle one changes its row counted from either end of the batch.

        Then the backward pass, which a coupling can reach without changing any loss value
        (``x + (m - m.detach())`` on a batch statistic, an ``autograd.Function`` whose backward
        mixes rows).  With weights ``w_j`` from a fixed-seed generator (uniform on [0.5, 1.5],
        independent of the data), the residual

            r = grad sum_j w_j l_j(batch) - grad w_0 l_0(batch[:1])
                - grad sum_{j>=1} w_j l_j(R)

        equals ``sum_j w_j D_j``, ``D_j`` sample ``j``'s autograd gradient in the batch minus
        the one in its part (alone for sample 0, in ``R`` for the others).  Independent
        samples have every ``D_j = 0`` and ``r`` is rounding: refused unless ``|r| <= tol G``,
        ``G = |grad sum_j w_j l_j(batch)|``, ``tol`` from :func:`_grad_tol`.

        Detected: if some ``D_j != 0`` then ``r != 0`` for every ``w`` off a proper subspace (a
        set of measure zero), and ``E_w |r|^2 >= Var(w) sum_j |D_j|^2 = sum_j |D_j|^2 / 12``.
        So: any coupling that involves sample 0 (its loss reaching another sample's path, or
        another loss reaching its path), and any coupling among the others that changes when
        sample 0 leaves and the others reverse their order: a statistic of the batch or of
        some of its rows, a backward that mixes rows ``1..B-1``, or (``B >= 4``) the last two
        rows (positions from the start and from the end both change).  Not detected: a
        coupling among samples ``1..B-1`` that ``R`` reproduces exactly (keyed on the samples'
        values rather than their rows; a rule on rows that maps onto itself under this
        reversal, as the last two rows of a batch of 3 do, ``R`` being those two), and
        any coupling when a gradient is non-finite (skipped: another sample's NaN reaches
        every row of a batched product as ``0 * NaN``, and the step drops such samples) or a
        backward pass fails here (left to the step to report).

        Cost: the parts' forwards (needed for their losses) keep their graphs, and three
        backward passes (``B``, ``B - 1`` and 1 samples) accumulate into the parameters'
        ``.grad`` (their own set aside and put back), so no gradient is copied.  ``backward``,
        not ``autograd.grad``: reentrant checkpointing supports only the former."""
        params = list(self.params.values())
        b = batch_len(batch)
        weights = _probe_weights(b)  # one draw for the three passes (each slices it)
        whole: float | None = None
        ok = bool(params)
        with _grads_set_aside(params):
            for lo, hi, flip, event in (
                (0, b, False, None),
                (1, b, True, "the first sample leaves its batch (the others in reverse order)"),
                (0, 1, False, "the other samples leave its batch"),
            ):
                part = batch if event is None else batch_slice(batch, lo, hi)
                part = batch_flip(part) if flip else part
                try:
                    _, l_part = self._probe_forward(loss_fn, part, expand, graph=True)
                except (RuntimeError, IndexError, ValueError) as err:
                    if event is None or isinstance(err, UnsupportedLayerError):
                        raise
                    raise _size_error(b, hi - lo, event, self._failed_at, err) from err
                mine = losses[lo:hi].flip(0) if flip else losses[lo:hi]
                if event is not None and not _close(l_part.detach(), mine):
                    where = self._locate_mixing(loss_fn, batch, part, lo, hi - lo, expand, flip)
                    raise _mixing_error(event, where)
                if not ok or not l_part.requires_grad:
                    ok = False
                    continue
                w = weights.to(l_part.device, l_part.dtype)[lo:hi]
                w = w.flip(0) if flip else w
                ok = self._accumulate(l_part, w if event is None else -w)
                del l_part
                if ok and event is None:
                    whole = _grad_norm(params)
            left = _grad_norm(params) if ok else None
        if whole is None or left is None:  # not comparable: no graph, a failed backward, NaN
            return
        if left > _grad_tol(params) * whole:
            raise _backward_mixing_error()

    def _accumulate(self, losses: Tensor, weights: Tensor) -> bool:
        """``grad sum_j weights_j losses_j`` added into the parameters' ``.grad`` by a
        backward pass that the step's parameter hooks ignore; False if it fails."""
        self.replaying = True
        try:
            (losses * weights).sum().backward()
        except RuntimeError:
            return False
        finally:
            self.replaying = False
        return True

    def _check_padding(self, loss_fn: Callable, batch: Any) -> None:
        """The padding probe (with :attr:`padding` ``= (pad, L)``): the first two samples of
        ``batch``, padded to their longest sequence and padded further to ``L`` positions by
        the caller's collator (``pad``), must have the same losses (:func:`_close`) and the same
        gradient: with the fixed weights ``w`` of :func:`_probe_weights`, the residual
        ``grad sum_j w_j l_j(tight) - grad sum_j w_j l_j(padded)`` at most ``tol G``, as in
        :meth:`_check_parts`.  Neither forward may change a buffer.

        The other probes keep the batch's padded length, so they cannot see a model whose
        output at the real positions depends on it: transformers' dynamic rope scaling
        recomputes the rotary frequencies from the padded length once it exceeds
        ``max_position_embeddings``, so one long record changes the gradient of every other
        sample padded to it in its batch, and neighbouring datasets differ by more than one
        clipped gradient.  Every padded length a batch can have lies between a sample's own
        and ``L`` (the collator pads to the batch's longest record, at most ``L``): a model
        that gives the same outputs at both ends is checked at the ends only (a dependence
        that vanishes at ``L`` but not between, e.g. only above some length below ``L``, is
        seen only where that length lies between the probe's two).  Cost: two forwards and two
        backward passes of two samples, one of them ``L`` positions long."""
        pad, length = self.padding
        part = batch_slice(batch, 0, min(batch_len(batch), 2))
        tight, wide = pad(part, None), pad(part, length)

        def state(changed: list[str]) -> UnsupportedLayerError:
            return _padding_error(
                length,
                f"the forward pass updates the buffers {', '.join(changed[:4])} of "
                f"{_owners(self.model, changed)} (put back)",
            )

        params = list(self.params.values())
        weights = _probe_weights(batch_len(part))
        whole: float | None = None
        ok = bool(params)
        with _grads_set_aside(params):
            l_tight: Tensor | None = None
            for sign, x in ((1.0, tight), (-1.0, wide)):
                try:
                    _, l_x = self._probe_forward(loss_fn, x, graph=True, state_error=state)
                except (RuntimeError, IndexError, ValueError) as err:
                    if isinstance(err, UnsupportedLayerError) or sign > 0:
                        raise
                    at = self._failed_at
                    at = f"layer {at}" if at and at != "the loss function" else "the loss function"
                    raise _padding_error(
                        length, f"{at} raises {type(err).__name__}: {_first_line(err)}"
                    ) from err
                if l_tight is None:
                    l_tight = l_x.detach()
                elif not _close(l_x.detach(), l_tight):
                    worst = float((l_x.detach() - l_tight).abs().max())
                    raise _padding_error(length, f"a sample's loss changes (by up to {worst:.3g})")
                if not ok or not l_x.requires_grad:
                    ok = False
                    continue
                ok = self._accumulate(l_x, weights.to(l_x.device, l_x.dtype) * sign)
                del l_x
                if ok and sign > 0:
                    whole = _grad_norm(params)
            left = _grad_norm(params) if ok else None
        if whole is not None and left is not None and left > _grad_tol(params) * whole:
            raise _padding_error(
                length, f"the samples' gradients change (residual {left / whole:.3g} of the norm)"
            )

    def probe(self, loss_fn: Callable, batch: Any) -> Plan:
        """Probe ``batch`` and it plus a copy of its first sample (for the batch axes, and that
        no sample's loss changes when a sample joins), then, for ``B >= 2``, ``batch[1:]``
        reversed and ``batch[:1]`` (that none changes when samples leave: a batch maximum, a
        ``unique`` or a norm of the largest sample is blind to a duplicate, not to a removal),
        and that the gradients of those two parts add up to the batch's (:meth:`_check_parts`:
        a coupling only the backward pass sees); with :attr:`padding`, that two samples' losses
        and gradient do not move when they are padded further, up to the public length bound
        (:meth:`_check_padding`: none of the others changes the padded length); plan every
        use."""
        _refuse_kernel_dropout(self.model)
        b = batch_len(batch)
        bigger = batch_cat(batch, batch_slice(batch, 0, 1))
        notes: list[str] = []
        try:
            with rng.GLOBAL_RNG, torch.random.fork_rng(devices=[]):
                # every probe draws the same (CPU) random numbers: a model that draws them beyond
                # dropout sees the same values for the same samples, so its batch axes can align
                self._rng = torch.get_rng_state()
                try:
                    big, l_big = self._probe_forward(loss_fn, bigger)
                except (RuntimeError, IndexError, ValueError) as err:
                    if isinstance(err, UnsupportedLayerError):
                        raise
                    where = self._failed_at
                    self._probe_forward(loss_fn, batch)  # its own error if it fails too
                    raise _size_error(
                        b, b + 1, "a copy of its first sample joins", where, err
                    ) from err
                expand = frozenset(
                    k
                    for k, r in big.ops.items()
                    if r.rule is not None and r.input_shape and r.input_shape[0] == 1
                )
                try:
                    small, l_small = self._probe_forward(loss_fn, batch, expand)
                    random = big.random or small.random
                    ok = random or _close(l_small, l_big[:b])
                    ok = ok and self._rows_own(loss_fn, batch, expand)
                except (RuntimeError, IndexError):  # broadcast, a shared tensor broke the
                    # forward (DeBERTa's relative embeddings, repeated per sample afterwards; a
                    # loss that calls the model on one sample at a time indexes a broadcast mask)
                    if not expand:
                        raise
                    random, ok = big.random, False
                if not ok and expand:
                    small, l_small = self._probe_forward(loss_fn, batch)
                    random = big.random or small.random
                    ok = random or _close(l_small, l_big[:b])
                    if ok:
                        expand = frozenset()
                        notes.append(
                            "uses shared by the batch (leading axis 1) are not broadcast: the "
                            "model's output changed (or failed) when they were, or a row of "
                            "theirs reached another sample's loss"
                        )
                if not ok:
                    where = self._locate_mixing(loss_fn, batch, bigger, 0, b)
                    raise _mixing_error("another sample joins its batch", where)
                if b >= 2 and not random:
                    self._check_parts(loss_fn, batch, expand, l_small)
                if self.padding is not None and not random:
                    self._check_padding(loss_fn, batch)
        finally:
            self._rng = None
        if random:
            notes.append(
                "the model draws random numbers other than dropout in its forward pass, so "
                "sample independence could not be checked by comparing losses"
            )
        self.plan = build_plan(
            small,
            big,
            verified=b >= 2 and not random,
            notes=notes,
            checkable=not random,
            modes=self.modes(),
            order=list(self.params),
            force_direct=frozenset(self._force_direct),
        )
        return self.plan

    def modes(self) -> tuple[bool, ...]:
        """Every module's ``training`` flag: the plan holds for these modes only (BatchNorm
        put back in train mode mixes samples; dropout switched on makes a module random)."""
        return tuple(m.training for m in self._modules)

    def _locate_mixing(
        self,
        loss_fn: Callable,
        batch: Any,
        other: Any,
        at: int,
        n: int,
        expand: frozenset = frozenset(),
        flip: bool = False,
    ) -> str:
        """Where samples ``at .. at + n`` of ``batch`` and the first ``n`` samples of ``other``
        (the same samples in another batch; in reverse order with ``flip``) part: the first
        module (in completion order) one of whose outputs differs for them, the innermost
        layer that mixes samples; where that layer's inputs (positional ones: the global hooks
        see no keyword arguments) already differ, the forward code of the outermost caller
        whose inputs do not, or the loss function before it calls the model; the loss
        function after the model where every layer's outputs agree.  Where the two batches
        run different layers, no layer beyond can be compared, and the message says so."""
        mine: list[tuple[nn.Module, list[Tensor], list[Tensor], nn.Module | None]] = []
        theirs: list[tuple[nn.Module, list[Tensor], list[Tensor], nn.Module | None]] = []
        self._probe_forward(loss_fn, batch, expand, outputs=mine)
        self._probe_forward(loss_fn, other, expand, outputs=theirs)
        b, o = batch_len(batch), batch_len(other)

        def differ(xs: list[Tensor], ys: list[Tensor]) -> bool:
            for a, c in zip(xs, ys, strict=False):
                axis = sample_axis(tuple(a.shape), tuple(c.shape), b, o)
                if axis is None or axis == INVALID:  # no per-sample axis to align
                    continue
                a = a.narrow(axis, at, n)
                if not _close(a.flip(axis) if flip else a, c.narrow(axis, 0, n)):
                    return True
            return False

        for (m, outs, ins, parent), (m2, outs2, ins2, _) in zip(mine, theirs, strict=False):
            if m is not m2 or len(outs) != len(outs2):
                return (
                    f"a layer from {self._layer(m)} on (the two batches run different layers "
                    "from there, so no layer's output can be compared beyond it)"
                )
            if differ(outs, outs2):
                if not differ(ins, ins2):
                    return self._layer(m)
                # the difference came from code outside any layer: the caller's
                calls = {id(c[0]): c for c in reversed(mine)}  # each module's first call
                calls2 = {id(c[0]): c for c in reversed(theirs)}
                inner, seen = m, {id(m)}
                while parent is not None and id(parent) in calls and id(parent) in calls2:
                    if id(parent) in seen or not differ(
                        calls[id(parent)][2], calls2[id(parent)][2]
                    ):
                        break
                    seen.add(id(parent))
                    inner, parent = parent, calls[id(parent)][3]
                if parent is None:
                    return (
                        f"the loss function, before it calls {self._layer(inner)} (that "
                        "layer's input already differs)"
                    )
                return (
                    f"the forward code of {self._layer(parent)} that computes the input of "
                    f"{self._layer(inner)} (that input already differs, and no layer it calls "
                    "before made the difference)"
                )
        if len(mine) != len(theirs):
            return (
                "a layer after the last one both batches run (the two batches run different "
                "numbers of layers, so the outputs beyond cannot be compared)"
            )
        return (
            "the loss function (every layer's output for these samples is the same in both "
            "batches: the samples meet in loss_fn, after the model)"
        )

    def _layer(self, m: nn.Module) -> str:
        return f"layer '{self._all_names.get(id(m), '?')}' ({type(m).__name__})"

    # -- one chunk -----------------------------------------------------------------------------

    def needs_probe(self, batch_size: int) -> bool:
        """Whether to probe before this chunk: no plan yet, a module's train/eval mode changed
        since the plan was made, or the plan awaits a batch of two or more to be verified."""
        plan = self.plan
        if plan is None or plan.modes != self.modes():
            return True
        return batch_size >= 2 and not plan.verified and plan.checkable

    def run(self, loss_fn: Callable, batch: Any) -> tuple[Recorded, Tensor]:
        """Forward and backward of one chunk: its recorded uses and per-sample losses.  Probes
        first when needed, and probes again and redoes the chunk once if the forward pass
        strays from the plan."""
        for attempt in range(2):
            if self.needs_probe(batch_len(batch)) or attempt:
                with rng.GLOBAL_RNG:  # NumPy's and Python's generators forked like torch's
                    self._host_rng = rng.host_state()
                    try:
                        self.probe(loss_fn, batch)
                    finally:  # the step draws what it would have drawn without the probes
                        rng.set_host_state(self._host_rng)
                        self._host_rng = None
            try:
                return self._run_once(loss_fn, batch)
            except PlanMiss as miss:
                if attempt:
                    raise RuntimeError(
                        f"dptrain could not plan the per-sample gradients of this model ({miss}). "
                        "This is a bug in dptrain; please report it with the model's class."
                    ) from None
            finally:
                self._reset()
        raise AssertionError("unreachable")

    def _reset(self) -> None:
        self.active = self.in_backward = self.replaying = False
        stack = self._stack
        stack.clear()
        if self._tls.entered:
            self._tls.entered = False
            self._mode.__exit__(None, None, None)

    def _run_once(self, loss_fn: Callable, batch: Any) -> tuple[Recorded, Tensor]:
        b = batch_len(batch)
        self.uses, self._locals, self._counts, self._unplanned = [], [], {}, set()
        self.batch_size, self.active = b, True
        self._row_counts = row_counts(tree_flatten(batch)[0], b)
        tree = _tree(self.model)  # one walk before the step, one after
        saved = _snapshot_buffers(self.model, tree)
        attrs = _snapshot_attrs(self.model, tree)
        weights = {n: p._version for n, p in tree.params}
        values = _param_state(self.model, self._rewritten, tree)
        try:
            with self._watch:  # writes through ``.data`` leave the version counters alone
                losses = _per_sample_losses(loss_fn(self.model, batch), b)
                direct = self._direct_grads(losses)
                self.in_backward, self._counts = True, {}  # recomputations replay the plan
                losses.sum().backward()
                self.in_backward = False
        finally:  # the model keeps no buffer value this step computed, whatever happens
            tree = _tree(self.model)  # the forward pass may have added modules or tensors
            changed = _restore_buffers(self.model, saved, tree)
            _restore_attrs(self.model, attrs, tree)  # e.g. RecurrentGemma's last recurrent state
            through_data = self._watch.moved()
        if changed:
            raise _buffers_error(self.model, changed, during_step=True)
        if through_data:
            raise _moved_error(
                [n for n, _ in through_data],
                f" through .data, in {', '.join(dict.fromkeys(w for _, w in through_data))}",
            )
        rewritten = _param_state(self.model, self._rewritten, tree)
        moved = [
            n
            for n, p in tree.params
            if weights.get(n) != p._version
            and (n not in values or not _same(values[n][1:], rewritten[n][1:]))
        ]
        if moved:
            raise _moved_error(moved)
        if self._unplanned:
            raise PlanMiss(
                f"unplanned direct gradients of {', '.join(sorted(self._unplanned)[:3])}"
            )
        return self._take(direct, b), losses

    def _direct_grads(self, losses: Tensor) -> dict[nn.Parameter, Tensor]:
        """Per-sample gradients of the directly differentiated parameters: the rows of the
        Jacobian of the loss vector, ``d loss_b / d p`` (paths through fused and aliased nodes
        excluded: those nodes give parameters no gradient)."""
        plan = self.plan
        params = [self.params[i] for i in plan.direct_order]
        if not params:
            return {}
        b = losses.shape[0]
        self.replaying, self._counts = True, {}
        try:
            rows = None
            if plan.direct_batched:
                try:
                    eye = torch.eye(b, dtype=losses.dtype, device=losses.device)
                    rows = torch.autograd.grad(
                        losses,
                        params,
                        eye,
                        retain_graph=True,
                        is_grads_batched=True,
                        allow_unused=True,
                    )
                except RuntimeError as err:  # a backward without a batching rule
                    plan.direct_batched = False  # not retried for this plan
                    reaching = (
                        f"the backward pass reaching {self._names(params[:3])}"
                        f"{', ...' if len(params) > 3 else ''}"
                    )
                    # public: the rule and the layers; the error's text (it may quote this
                    # batch's shapes, so its Poisson size) goes to the private notes
                    plan.notes.append(
                        f"{reaching} has no batching rule ({type(err).__name__}): their "
                        "per-sample gradients take one backward pass per sample"
                    )
                    plan.private_notes.append(f"{reaching}: {_first_line(err)}")
            if rows is None:  # one sample at a time
                per = [
                    torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
                    for i in range(b)
                ]
                rows = [
                    torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in per])
                    for j, p in enumerate(params)
                ]
        finally:
            self.replaying = False
        return {
            p: (g.detach() if g is not None else p.new_zeros(b, *p.shape))
            for p, g in zip(params, rows, strict=True)
        }

    def _take(self, direct: dict[nn.Parameter, Tensor], b: int) -> Recorded:
        for local, start, end in self._locals:
            adopted = local.cache["adopted"]
            for use in self.uses[start:end]:
                if use is not local:
                    use.params = {r: p for r, p in use.params.items() if id(p) not in adopted}
        uses = []
        for u in self.uses:
            has_grad = (
                any(g is not None for g in u.grad)
                if isinstance(u.grad, list)
                else u.grad is not None
            )
            if u.params and has_grad:
                uses.append(u)
        self.uses = []
        return Recorded(uses, direct, b)

    # -- reporting -----------------------------------------------------------------------------

    def describe(self) -> dict[str, str]:
        """Parameter name -> how its per-sample gradient is formed under the current plan."""
        out: dict[str, set[str]] = {n: set() for n in self.param_names.values()}
        if self.plan is None:
            return {n: "not planned yet" for n in out}
        modules = {id(m): m for _, m in self.scopes}
        for key, d in self.plan.ops.items():
            for pid in d.touched:
                if d.kind == "fuse":
                    what = d.rule.name + (" (shared input, broadcast)" if d.expand else "")
                elif d.kind == "local":
                    m = modules.get(key[0][0])
                    what = f"{type(m).__name__} re-run per sample"
                else:
                    what = "autograd, one backward per sample (slow)"
                out[self.param_names[pid]].add(what)
        return {n: ", ".join(sorted(v)) or "unused" for n, v in out.items()}

    def summary(self) -> dict[str, Any]:
        """How many parameters each rule covers, and the parameters on the slow path; public
        (``run.json``): layer names and rules only, nothing computed from a batch's values or
        size (those go to :meth:`private_notes`)."""
        rules: dict[str, int] = {}
        slow = []
        for name, how in self.describe().items():
            rules[how] = rules.get(how, 0) + 1
            if "autograd" in how:
                slow.append(name)
        notes = list(self.plan.notes) if self.plan is not None else []
        return {"rules": rules, "autograd_per_sample": slow, "notes": notes}

    def private_notes(self) -> list[str]:
        """Diagnostics computed from private batches (error texts that may quote a batch's
        shapes): for ``private/stats.json``, never ``run.json``."""
        return list(self.plan.private_notes) if self.plan is not None else []

    def _names(self, params: list[nn.Parameter]) -> str:
        return ", ".join(self.param_names.get(id(p), "?") for p in params)


def _refuse_kernel_dropout(model: nn.Module) -> None:
    """Refuse a recurrent layer (``nn.LSTM``/``GRU``/``RNN``, ``num_layers > 1``) with
    ``dropout > 0`` in train mode: its masks are drawn inside the fused kernel, where the
    probes cannot switch them off (two probes draw different masks, which looked like samples
    mixing) and no per-sample re-run can replay them."""
    for name, m in model.named_modules():
        if isinstance(m, nn.RNNBase) and m.training and m.dropout > 0 and m.num_layers > 1:
            raise UnsupportedLayerError(
                f"layer '{name or '<model>'}' ({type(m).__name__}) applies dropout = {m.dropout} "
                "between its layers in train mode; its masks are drawn inside the recurrent "
                "kernel, where dptrain can neither see them nor give each sample's gradient "
                "the mask its forward pass used. Fix: build it with dropout=0 (stack "
                "single-layer recurrent layers with nn.Dropout between them if you need it), "
                "or put that layer in eval mode"
            )


def _transformed(args: tuple, kwargs: dict) -> bool:
    """Whether a tensor among the arguments is a functorch wrapper (a call inside the model's
    own ``torch.vmap``, ``torch.func.grad``...)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(isinstance(v, Tensor) and wrapped(v) for v in tree_flatten((args, kwargs))[0])


def _collect(values: Any, params: dict[int, nn.Parameter], found: dict[int, nn.Parameter]) -> None:
    """Add to ``found`` the tensors among ``values`` (and inside their lists and tuples) whose
    ids are keys of ``params``, depth first, the first time each is seen."""
    for v in values:
        if isinstance(v, Tensor):
            if id(v) in params and id(v) not in found:
                found[id(v)] = v
        elif isinstance(v, (list, tuple)):
            _collect(v, params, found)


def _module_tracking(path: list[nn.Module], outputs: list | None) -> list[Any]:
    """Global module hooks keeping the stack of running modules (and, with ``outputs``, every
    module call in completion order: the module, its floating-point output and input tensors,
    detached, and the module that called it)."""
    inputs: list[tuple[list[Tensor], nn.Module | None]] = []

    def floats(x: Any) -> list[Tensor]:
        leaves = tree_flatten(x)[0]
        return [t.detach() for t in leaves if isinstance(t, Tensor) and t.is_floating_point()]

    def pre(module: nn.Module, args: Any) -> None:
        if outputs is not None:
            inputs.append((floats(args), path[-1] if path else None))
        path.append(module)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if path and path[-1] is module:
            path.pop()
        if outputs is not None:
            ins, parent = inputs.pop() if inputs else ([], None)
            outputs.append((module, floats(output), ins, parent))

    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    return [
        register_module_forward_pre_hook(pre),
        register_module_forward_hook(post, always_call=True),
    ]


def _first_line(err: BaseException, limit: int = 120) -> str:
    line = next((s for s in str(err).splitlines() if s.strip()), type(err).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _mixing_error(event: str, where: str) -> UnsupportedLayerError:
    fix = (
        "compute each sample's loss from that sample alone (no in-batch negatives, batch "
        "means or totals, of the inputs or of the outputs)"
        if where.startswith("the loss function")
        else "make it act on each sample alone (e.g. LayerNorm or GroupNorm instead of "
        "a batch statistic)"
    )
    return UnsupportedLayerError(
        f"a sample's loss changes when {event}: {where} mixes the samples of a batch (its "
        "output for one sample depends on other samples), so per-sample gradients do not "
        f"exist. Fix: {fix}"
    )


def _size_error(
    b: int, n: int, event: str, where: str | None, err: BaseException
) -> UnsupportedLayerError:
    """The model runs on the batch (``b`` samples) but raises on another batch of the same
    samples (``n`` of them): its computation depends on how many samples the batch has (a layer
    applied across the batch axis, a shape or a state sized to the batch), so a sample's loss is
    not its own and the per-example loop could not run it either.  The message quotes the
    exception's first line (shapes, not values) and the layer where it was raised."""
    at = f"layer {where}" if where and where != "the loss function" else "the loss function"
    return UnsupportedLayerError(
        f"the model runs on a batch of {b} samples but fails when {event} ({n} samples): "
        f"{at} raised {type(err).__name__}: {_first_line(err)}. Its computation depends on "
        "the batch size (e.g. a layer applied across the batch axis, or a shape or state "
        "sized to the batch), so a sample's loss is not its own and per-sample gradients do "
        "not exist. Fix: make every layer act on each sample alone, with the batch on its "
        "own axis (never a feature axis of a layer), and nothing sized to the batch"
    )


def _padding_error(length: int, observed: str) -> UnsupportedLayerError:
    """The padding probe's refusal (:meth:`GradCapture._check_padding`): what it observed."""
    return UnsupportedLayerError(
        f"{observed} when the same samples are padded further, to max_length = {length} "
        "positions (the added positions masked out, as the collator pads): the model's "
        "outputs depend on the batch's padded length (e.g. dynamic rope scaling beyond "
        "max_position_embeddings, or longrope beyond original_max_position_embeddings, which "
        "recompute the rotary frequencies from the longest sequence of the batch; or a layer "
        "that reads the padding positions), so one long "
        "record changes the gradients of the other samples of its batch and neighbouring "
        "datasets differ by more than one clipped gradient. Fix: lower data.max_length to "
        "at most the length the model does not rescale at (max_position_embeddings for "
        "dynamic rope, original_max_position_embeddings for longrope), use a rope type "
        "that does not follow the length (rope_scaling default, linear or yarn), or make "
        "every output at a real position independent of the padding"
    )


def _buffers_error(
    model: nn.Module, changed: list[str], during_step: bool = False
) -> UnsupportedLayerError:
    """Refuse a forward that changed the buffers ``changed`` (put back).  Running statistics
    of a norm layer (BatchNorm in train mode) get the norm layers' fix; other owners (a rotary
    embedding recomputing its frequencies from the sequence length: transformers' dynamic
    rope beyond ``max_position_embeddings``, longrope beyond its original length) get what
    was observed and the plausible causes."""
    names, owners = ", ".join(changed[:4]), _owners(model, changed)
    head = (
        f"the buffers {names} were updated during a private step (now restored; {owners})"
        if during_step
        else f"the forward pass updates the buffers {names} of {owners} (put back)"
    )
    owner_classes = {type(model.get_submodule(n.rpartition(".")[0])).__name__ for n in changed}
    if "_SpectralNorm" in owner_classes:  # torch.nn.utils.parametrizations.spectral_norm
        return UnsupportedLayerError(
            f"{head}: spectral_norm's power iteration updates _u and _v at every forward pass "
            "in train mode (from the weight, not the data), so the probes, and a per-sample "
            "loop, each advance it and no sample's gradient is its own function of the batch. "
            "Fix: put the spectral-normed layers in eval mode for private training (the "
            "stored vectors are used as they are; run power iterations first, in train mode "
            "under torch.no_grad(), on public or random inputs)"
        )
    if any(_is_norm(model.get_submodule(n.rpartition(".")[0])) for n in changed):
        return UnsupportedLayerError(
            f"{head}, from the data (e.g. BatchNorm's running statistics in train mode): they "
            "would be computed from private records without noise and saved with the model. "
            "Fix: use GroupNorm or LayerNorm, or put those layers in eval mode with frozen "
            "statistics"
        )
    return UnsupportedLayerError(
        f"{head}: the forward pass computes a state from the batch and keeps it in the model "
        "(from private records, without noise), so later batches see it. Plausible causes: "
        "a rotary embedding that recomputes its frequencies from the sequence length "
        "(transformers' dynamic rope scaling beyond max_position_embeddings, longrope beyond "
        "original_max_position_embeddings), a cache or counter kept in a buffer, running "
        "statistics. Fix: keep every sequence within the length the layer does not rescale "
        "at (data.max_length <= max_position_embeddings, or original_max_position_embeddings "
        "for longrope), use a rope type that does not follow the length, or compute that "
        "value from public constants instead of storing it"
    )


def _is_norm(m: nn.Module) -> bool:
    """A layer that keeps running statistics: torch's norm base class, or a class named
    like one (``...Norm...``)."""
    return isinstance(m, nn.modules.batchnorm._NormBase) or "norm" in type(m).__name__.lower()


@contextlib.contextmanager
def _grads_set_aside(params: list[nn.Parameter]) -> Iterator[None]:
    """The parameters' ``.grad`` set aside (None inside the block) and put back after it."""
    kept = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, g in zip(params, kept, strict=True):
            p.grad = g


def _probe_weights(b: int) -> Tensor:
    """The residual check's weights (:meth:`GradCapture._check_parts`): ``b`` draws, uniform on
    [0.5, 1.5], from a fixed-seed CPU generator of their own (public, the same for every probe;
    the global generators are not touched).  Positive, so the weighted gradient keeps the scale
    of the plain sum."""
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    return torch.rand(b, generator=gen, dtype=torch.float64, device="cpu") + 0.5


def _grad_norm(params: list[nn.Parameter]) -> float | None:
    """``|g|`` over all ``.grad`` in float64 (absent ones count as 0); None if non-finite."""
    total = 0.0
    for p in params:
        g = p.grad
        if g is None:
            continue
        g = g.to_dense() if g.is_sparse else g
        total += float(g.detach().double().square().sum())
    return total**0.5 if total == total and total != float("inf") else None


def _precision(params: list[Tensor]) -> torch.dtype:
    """The least precise float type a gradient is computed in: the autocast type under CPU or
    CUDA autocast, else the parameters' least precise type (bfloat16 before float16, the type
    with the larger machine epsilon)."""
    for device in ("cpu", "cuda"):
        try:
            if torch.is_autocast_enabled(device):
                return torch.get_autocast_dtype(device)
        except (RuntimeError, TypeError, AttributeError):
            continue
    dtypes = {p.dtype for p in params if p.is_floating_point()} or {torch.float64}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _tf32(params: list[Tensor]) -> bool:
    """Whether float32 products of these (CUDA) parameters may run in TF32 (10-bit mantissa)."""
    if not any(p.is_cuda for p in params):
        return False
    return bool(
        torch.backends.cuda.matmul.allow_tf32
        or torch.backends.cudnn.allow_tf32
        or torch.get_float32_matmul_precision() != "highest"
    )


def _grad_tol(params: list[Tensor]) -> float:
    """The residual check's tolerance (:meth:`GradCapture._check_parts`), relative to the whole
    gradient's norm, for the precision the gradients are computed in (:func:`_precision`).

    16-bit types (and float32 on CUDA where TF32 may be used, 10-bit mantissa): ``8 eps``,
    i.e. 6.25e-2 in bfloat16 (``eps = 2^-7``), 7.8e-3 in float16 and TF32 (``eps = 2^-10``).
    With independent samples the residual is rounding: each gradient is rounded to the
    parameters' type (or computed from activations rounded to the autocast type), and the
    batched products of ``B``, ``B - 1`` and 1 samples round differently.  Measured: 0.3-0.8
    ``eps`` on GPT-2, Llama, Gemma, Llama-LoRA, a conv net and an LSTM (bf16 and fp16
    weights, CPU autocast to either), and 0.32-0.36 ``eps`` on GPT-2 from 2 to 12 layers and
    width 16 to 256: the rounding of the stored gradient dominates and does not grow with
    depth, so ``8 eps`` leaves a margin of 10x or more while a coupling moves the gradient by
    a fraction of itself.  float16 is 8x more precise than bfloat16, and its tolerance 8x
    tighter (one flat 5e-2 was 51 ``eps`` in float16).  float32: 1e-4 (measured up to
    2.3 ``eps`` = 2.8e-7 on a conv net, whose algorithm and summation order may change with
    the batch size), float64: 1e-6."""
    dtype = _precision(params)
    if dtype == torch.float32 and _tf32(params):
        return 8 * 2.0**-10
    if dtype in _WIDE_TOL:
        return _WIDE_TOL[dtype]
    return 8 * torch.finfo(dtype).eps


_WIDE_TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def _backward_mixing_error() -> UnsupportedLayerError:
    return UnsupportedLayerError(
        "the samples' gradients change when the batch is split into its first sample and the "
        "others, although every sample's loss stays within rounding of its value: the "
        "backward pass mixes the samples of a batch (a batch statistic added with its value "
        "cancelled, `x + (m - m.detach())`; an autograd.Function whose backward couples "
        "samples; or a small term computed from the whole batch added to every sample's loss, "
        "such as a mixture-of-experts router's load-balancing `aux_loss`), so per-sample "
        "gradients do not exist. No layer can be named: only gradients differ beyond rounding. "
        "Fix: make every layer's backward, and the loss's, act on each sample alone (leave "
        "batch-level terms such as `aux_loss` out of loss_fn)"
    )


def _per_sample_losses(losses: Any, b: int) -> Tensor:
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != b:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({b},); got {shape}. "
            "Use reduction='none'."
        )
    return losses


@dataclass
class _Tree:
    """One walk of a model: what ``modules()``, ``named_parameters()`` and ``named_buffers()``
    yield (the same objects, names and order)."""

    modules: list[nn.Module]
    params: list[tuple[str, nn.Parameter]]
    buffers: list[tuple[str, Tensor]]


_BASE_WALK = (
    nn.Module.modules,
    nn.Module.named_parameters,
    nn.Module.named_buffers,
    nn.Module._named_members,
)


def _tree(model: nn.Module) -> _Tree:
    """The model's modules, parameters and buffers from a single ``named_modules()`` walk,
    each parameter and buffer under the name of its first owner (as ``torch``'s own walks
    deduplicate them); a class that overrides one of those walks is asked each separately."""
    cls = type(model)
    if (cls.modules, cls.named_parameters, cls.named_buffers, cls._named_members) != _BASE_WALK:
        return _Tree(
            list(model.modules()), list(model.named_parameters()), list(model.named_buffers())
        )
    modules, params, buffers = [], [], []
    seen_p: set[int] = set()
    seen_b: set[int] = set()
    walk = _named_modules(model)
    for prefix, m in walk if walk is not None else model.named_modules():
        modules.append(m)
        own_p, own_b = m._parameters, m._buffers
        if not (own_p or own_b):  # most modules of a LoRA model: nothing to name
            continue
        dot = prefix + "." if prefix else ""
        for k, v in own_p.items():
            if v is not None and id(v) not in seen_p:
                seen_p.add(id(v))
                params.append((dot + k, v))
        for k, v in own_b.items():
            if v is not None and id(v) not in seen_b:
                seen_b.add(id(v))
                buffers.append((dot + k, v))
    return _Tree(modules, params, buffers)


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """What ``model.named_modules()`` yields (the same pairs in the same order: preorder, each
    module once, under its first name), from one loop instead of a generator per level; None
    if a module's class overrides ``named_modules`` or its identity (``__eq__``, ``__hash__``):
    then it must be asked."""
    out = []
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        prefix, m = stack.pop()
        cls = type(m)  # read every walk: a class patched after a step is seen at the next
        if (cls.named_modules, cls.__eq__, cls.__hash__) != _BASE_IDENTITY:
            return None
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append((prefix, m))
        children = m._modules
        if children:
            dot = prefix + "." if prefix else ""
            stack.extend([(dot + k, c) for k, c in reversed(children.items()) if c is not None])
    return out


_BASE_IDENTITY = (nn.Module.named_modules, object.__eq__, object.__hash__)


def _snapshot_buffers(model: nn.Module, tree: _Tree | None = None) -> dict[str, Tensor]:
    """A copy of every buffer's values (one walk of the modules)."""
    return {n: b.detach().clone() for n, b in (tree or _tree(model)).buffers if b is not None}


_Attrs = dict[int, tuple[nn.Module, dict[str, Any]]]


def _snapshot_attrs(model: nn.Module, tree: _Tree | None = None) -> _Attrs:
    """Every module's plain attributes (its ``__dict__``, copied: a C-level copy of the
    references; parameters and buffers live in ``_parameters`` / ``_buffers``)."""
    return {id(m): (m, m.__dict__.copy()) for m in (tree or _tree(model)).modules}


def _restore_attrs(model: nn.Module, saved: _Attrs, tree: _Tree | None = None) -> None:
    """Put back every plain tensor attribute a step set or replaced (a recurrent state of the
    last batch, as RecurrentGemma keeps: ``(B, ...)`` tensors computed from private records,
    outside the parameters, that a pickled or reused model object would carry); a new one is
    removed.  A module whose attributes are the same objects under the same names is skipped
    without looking at them.  (A tensor attribute changed in place is not seen.)"""
    for m in (tree or _tree(model)).modules:
        entry = saved.get(id(m))
        before = entry[1] if entry is not None else {}
        now = m.__dict__
        if entry is not None and now.keys() == before.keys():
            if all(map(operator.is_, now.values(), before.values())):
                continue
        for k, v in list(now.items()):
            if isinstance(v, Tensor) and before.get(k, _MISSING) is not v:
                if k in before:
                    now[k] = before[k]
                else:
                    del now[k]


_MISSING = object()


def _restore_buffers(
    model: nn.Module, saved: dict[str, Tensor], tree: _Tree | None = None
) -> list[str]:
    """Put back every buffer that changed since ``saved``; the names of those buffers.  Values
    are compared, not version counters: kernels such as batch norm update running statistics
    in place without bumping them, and so does a write through ``.data``; a buffer written
    with the values it had (a bumped counter: longrope copies its short-factor frequencies
    into ``inv_freq`` on every call within ``original_max_position_embeddings``) keeps no
    state of the batch and is not a change."""
    changed = []
    with torch.no_grad():
        for n, b in (tree or _tree(model)).buffers:
            if b is None or n not in saved:
                continue
            old = saved[n]
            same = b.shape == old.shape and bool(((b == old) | (b != b) & (old != old)).all())
            if not same:
                changed.append(n)
                if b.shape == old.shape:
                    b.copy_(old)
                else:  # replaced by a buffer of another shape: put the old one back
                    owner, _, leaf = n.rpartition(".")
                    model.get_submodule(owner)._buffers[leaf] = old
    return changed


def _param_state(
    model: nn.Module, names: set[str] | None = None, tree: _Tree | None = None
) -> dict[str, tuple[int, float, float]]:
    """The parameters' (all, or those in ``names``) version counters and value fingerprints
    (sum and norm in float64): a write through ``.data`` leaves the counter alone, not the
    values."""
    if names is not None and not names:
        return {}  # nothing to fingerprint: no walk of the modules
    return {
        n: (p._version, *fingerprint(p))
        for n, p in (tree or _tree(model)).params
        if names is None or n in names
    }


def _same(a: tuple, b: tuple) -> bool:
    return all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))


def _moved_error(names: list[str], how: str = "") -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"the forward pass changes the parameters {', '.join(names[:4])} in place{how} (outside the "
        "noisy update): a change computed from private records would reach the model without "
        "noise, and they now hold it. Fix: reload those weights, and make the forward pass "
        "leave parameters unchanged (e.g. compute a normalized copy instead of writing it back)"
    )


def _tensor_attrs(module: nn.Module | None) -> dict[str, int | None]:
    """Ids of the plain tensor attributes of ``module`` and of its submodules, and of their
    parameters: a call that changes one (keeps a state, or swaps a parameter for a merged
    tensor and back, as peft's LoRA on ``nn.MultiheadAttention`` does) cannot be re-run."""
    if module is None:
        return {}
    out: dict[str, int | None] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        for k, v in vars(m).items():
            if isinstance(v, Tensor):
                out[f"{prefix}.{k}"] = id(v)
        for k, v in m._parameters.items():
            out[f"{prefix}.{k}:param"] = None if v is None else id(v)
    return out


_PLAIN = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, type)


def _held_state(leaves: list[Any], depth: int = 4) -> list[Any]:
    """What the non-tensor arguments of a call hold: every tensor reachable through their
    attributes, lists and dicts (to ``depth`` levels) as (id, version, shape), with the
    attribute names and container lengths, so that an object the call updates (a cache that
    appends keys, a state set from ``None``) compares unequal before and after it."""
    out: list[Any] = []
    seen: set[int] = set()

    def walk(obj: Any, d: int) -> None:
        if isinstance(obj, Tensor):
            out.append((id(obj), obj._version, tuple(obj.shape)))
            return
        if d == 0 or isinstance(obj, (_PLAIN, nn.Module)) or callable(obj) or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            out.append(len(obj))
            for v in obj:
                walk(v, d - 1)
        elif isinstance(obj, dict):
            out.append(len(obj))
            for k, v in obj.items():
                out.append(k if isinstance(k, (str, int)) else None)
                walk(v, d - 1)
        elif hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                out.append(k)
                walk(v, d - 1)

    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            walk(leaf, depth)
    return out


def _owners(model: nn.Module, buffers: list[str]) -> str:
    """The modules owning ``buffers``, as ``layer 'name' (Class)``."""
    owners = dict.fromkeys(n.rpartition(".")[0] for n in buffers)
    return ", ".join(
        f"layer '{o or '<model>'}' ({type(model.get_submodule(o)).__name__})"
        for o in list(owners)[:4]
    )


def _buffer_versions(model: nn.Module) -> dict[str, int]:
    return {n: b._version for n, b in model.named_buffers() if b is not None}


_VALUE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
_FLAT_TOL = 3e-2  # the former flat tolerance of every 16-bit (and non-float) value


def _value_tol(dtype: torch.dtype) -> float:
    """The tolerance of :func:`_close` for values of ``dtype`` (a sample's loss, a layer's
    output): ``|a - b| <= tol (1 + |b|)``.

    A value is rounded to its type once per evaluation (``|error| <= eps / 2 |v|``), so two
    evaluations of the same exact value differ by at most ``eps |v|``; different batched
    products before it add rounding of the same order (measured for the whole gradient:
    0.3-0.8 ``eps``, :func:`_grad_tol`; 0 for the losses of GPT-2 and Llama on the CPU).
    16-bit types: ``8 eps`` (float16: 7.8e-3, was 3e-2 = 31 ``eps``), at most the former
    flat 3e-2 (bfloat16 stays at 3e-2 = 3.8 ``eps``: no value is compared more loosely than
    before).  float32 1e-4, float64 1e-8; non-float values keep 3e-2."""
    if dtype in _VALUE_TOL:
        return _VALUE_TOL[dtype]
    if not dtype.is_floating_point:
        return _FLAT_TOL
    return min(_FLAT_TOL, 8 * torch.finfo(dtype).eps)


def _close(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` matches ``b`` within :func:`_value_tol` of ``a``'s type, with the same
    non-finite entries."""
    if a.shape != b.shape:
        return False
    tol = _value_tol(a.dtype)
    a, b = a.detach().double(), b.detach().double()
    both = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return False
    return bool(((a - b).abs()[both] <= tol * (1 + b.abs()[both])).all())


def _without_dropout(func: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """The call with dropout switched off, and whether it would have drawn random numbers."""
    args, kwargs = list(args), dict(kwargs)
    if func is F.scaled_dot_product_attention:
        p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
        if len(args) > 4:
            args[4] = 0.0
        else:
            kwargs["dropout_p"] = 0.0
        return tuple(args), kwargs, bool(p)
    if func in _DROPOUT_RAW:  # (input, p, train)
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        train = args[2] if len(args) > 2 else kwargs.get("train", True)
        if len(args) > 2:
            args[2] = False
        else:
            kwargs["train"] = False
        return tuple(args), kwargs, bool(p and train)
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", True)
    if len(args) > 2:
        args[2] = False
    else:
        kwargs["training"] = False
    return tuple(args), kwargs, bool(p and training)


def detach_tree(x: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


__all__ = ["GradCapture", "OpCall", "PlanMiss", "Recorded", "register_scope"]
