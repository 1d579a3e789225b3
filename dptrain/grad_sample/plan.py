"""The probe and the plan: how each use of a trainable parameter gets its per-sample gradient.

Before the first step (and whenever the model's structure differs from what was planned), the
capture runs two forward passes without recording gradients: on the chunk's ``B`` samples and
on the same samples plus a copy of the first (``B + 1``).  For every call of a torch function
that touches a trainable parameter, and every call of a module that owns one, it logs the
shapes of the inputs and outputs.  An axis that is ``B`` long in one probe and ``B + 1`` in the
other is the batch axis; a tensor whose shape does not change has none (it is shared by the
batch, like T5's relative-position buckets, whatever its length).  Nothing is inferred from a
single shape, so a sequence as long as the batch is never taken for it.

The batch axis must also hold the samples in their order: per-sample fingerprints (sum, sum of
squares and of absolute values along that axis) of each input and output of a use must be the
smaller probe's for the first ``B`` indices and the first sample's for the extra one.  A model
that reorders the batch between layers (``x.flip(0)``, sorting by length) fails this, since the
copy of the first sample is not last in the reordered batch, and its uses are differentiated
directly: a rule that took row ``b`` for sample ``b`` would give each sample another's gradient.

Each use then gets one of three treatments:

* **fuse**: a registered function (:mod:`.ops`) on a batch-first input -- per-sample gradients
  in closed form or by ``vmap`` of the function;
* **local**: the innermost module call around the use re-run per sample (:mod:`.local`), when
  every input and output of that call has an observed batch axis (or none), the call draws no
  random numbers, and the parameters can be named inside that module;
* **direct**: anything else (a use outside every module that owns parameters, a use shared by
  the batch, a module call that cannot be re-run): per-sample gradients of these parameters are
  Jacobian rows of the per-sample loss vector, one backward per sample (:mod:`.capture`).

The probes also check what makes per-sample gradients meaningless: a function that normalizes
over the batch in its current mode (BatchNorm in train mode, trainable or frozen), a buffer
updated from the data during the forward pass (running statistics), and a per-sample loss
that changes when other samples are added or removed (any other layer that mixes samples,
parameter-free or not: two more forward passes, on ``batch[1:]`` and ``batch[:1]``, see what a
duplicate cannot, a batch maximum or ``unique``), and a forward pass that writes parameters in
place.  Dropout is switched off in the probes so the losses can be compared.  A plan holds for
the modules' train/eval modes it was probed in; a change of any ``training`` flag probes again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .ops import OpRule

ROOT = ("root", 0)
ScopeKey = tuple[Any, int]
OpKey = tuple[ScopeKey, int]
INVALID = -1


@dataclass
class OpRecord:
    """What a probe saw of one parameter-touching function call."""

    key: OpKey
    func: Any
    touched: frozenset[int]  # ids of the trainable parameters among its arguments
    rule: OpRule | None  # the registered rule, if the call has its form
    input_shape: tuple[int, ...] | None = None
    rows: Tensor | None = None  # per-sample fingerprints of a flattened (B*T, ...) input
    samples: dict[int, Tensor] = field(default_factory=dict)  # axis -> its fingerprints


@dataclass
class ScopeRecord:
    """What a probe saw of one call of a module that owns trainable parameters."""

    key: ScopeKey
    module: nn.Module | None
    in_shapes: list[tuple[int, ...] | None]
    out_shapes: list[tuple[int, ...] | None] = field(default_factory=list)
    out_grad: list[bool] = field(default_factory=list)
    random: bool = False
    in_samples: list[dict[int, Tensor]] = field(default_factory=list)  # per leaf, as OpRecord's
    out_samples: list[dict[int, Tensor]] = field(default_factory=list)


RowCount = tuple[int, int]
"""``(leaf, k)``: the product of dimensions ``1..k`` of the batch's ``leaf``-th tensor (a
candidate number of rows per sample of a flattened input, :func:`row_counts`)."""


def row_counts(leaves: list[Any], b: int) -> dict[RowCount, int]:
    """Every product of a batch-first tensor's leading non-batch dimensions, by ``(leaf, k)``:
    ``T`` of an ``(B, T)`` ``input_ids``, ``C`` and ``C T`` of a ``(B, C, T)`` one."""
    out: dict[RowCount, int] = {}
    for i, x in enumerate(leaves):
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == b:
            n = 1
            for k in range(1, x.dim()):
                n *= int(x.shape[k])
                out[(i, k)] = n
    return out


@dataclass
class ProbeLog:
    batch_size: int
    row_counts: dict[RowCount, int] = field(default_factory=dict)  # of the probe's batch
    ops: dict[OpKey, OpRecord] = field(default_factory=dict)
    scopes: dict[ScopeKey, ScopeRecord] = field(default_factory=dict)
    mixing: list[str] = field(default_factory=list)
    random: bool = False  # random numbers other than dropout were drawn
    expand: frozenset[OpKey] = frozenset()  # shared-input uses broadcast to the batch here
    # with a list: each broadcast output gets a zero (B, ...) addend that requires grad, its
    # gradient the rows' (:meth:`GradCapture._rows_own`)
    taps: list[Tensor] | None = None


@dataclass
class Decision:
    kind: str  # "fuse" | "local" | "direct"
    touched: frozenset[int] = frozenset()
    func: Any = None  # the function probed at this position (a step calling another re-plans)
    rule: OpRule | None = None
    expand: bool = False  # a shared (1, ...) input broadcast to the batch (verified neutral)
    rows: bool = False  # a (B*T, ...) input whose rows are sample-major (observed)
    rows_from: RowCount | None = None  # which of the batch's sizes T is, at every step


@dataclass
class LocalSpec:
    """A module call re-run per sample: the parameters it covers and the batch axes."""

    names: dict[int, str]  # parameter id -> qualified name inside the module
    in_axes: list[int | None]
    out_axes: list[int | None]


@dataclass
class Plan:
    batch_size: int
    ops: dict[OpKey, Decision]
    scopes: dict[ScopeKey, LocalSpec]
    direct: frozenset[int]
    verified: bool  # sample independence was checked on distinct samples
    notes: list[str] = field(default_factory=list)  # public (run.json): structure only
    checkable: bool = True  # False: the forward draws random numbers; losses cannot be compared
    calls: dict[int, int] = field(default_factory=dict)  # module id -> calls per forward
    modes: tuple[bool, ...] = ()  # every module's ``training`` flag when probed
    direct_batched: bool = True  # the Jacobian rows come from one vectorized backward
    direct_order: tuple[int, ...] = ()  # the directly differentiated parameters, model order
    # data-dependent diagnostics (error texts may quote the shapes of a Poisson batch, a
    # function of the secret coins): private/stats.json only
    private_notes: list[str] = field(default_factory=list)


def batch_axis(small: tuple[int, ...] | None, big: tuple[int, ...] | None, b: int) -> int | None:
    """The axis that is ``b`` long at batch size ``b`` and ``b + 1`` at ``b + 1``; None when the
    shape does not change (no batch axis); :data:`INVALID` otherwise."""
    return sample_axis(small, big, b, b + 1)


def sample_axis(
    a: tuple[int, ...] | None, c: tuple[int, ...] | None, n_a: int, n_c: int
) -> int | None:
    """The one axis that is ``n_a`` long in shape ``a`` (a batch of ``n_a`` samples) and
    ``n_c`` long in ``c`` (``n_c != n_a`` samples); None when the shapes are equal (no batch
    axis); :data:`INVALID` otherwise."""
    if a is None or c is None or len(a) != len(c):
        return INVALID
    if a == c:
        return None
    axes = [i for i, (s, t) in enumerate(zip(a, c, strict=True)) if s != t]
    if len(axes) == 1 and a[axes[0]] == n_a and c[axes[0]] == n_c:
        return axes[0]
    return INVALID


def _local_axes(
    small: ScopeRecord | None, big: ScopeRecord | None, b: int
) -> tuple[list[int | None], list[int | None]] | None:
    if small is None or big is None or small.module is None or small.random or big.random:
        return None
    if len(small.in_shapes) != len(big.in_shapes) or len(small.out_shapes) != len(big.out_shapes):
        return None
    in_axes = []
    for i, (s, t) in enumerate(zip(small.in_shapes, big.in_shapes, strict=True)):
        if s is None and t is None:
            in_axes.append(None)  # not a tensor: passed as it is
            continue
        axis = batch_axis(s, t, b)
        if axis == INVALID:
            return None
        if axis is not None and not _aligned(small.in_samples[i], big.in_samples[i], axis, b):
            return None  # the batch axis holds the samples in another order
        in_axes.append(axis)
    out_axes = []
    outs = zip(small.out_shapes, big.out_shapes, small.out_grad, strict=True)
    for i, (s, t, needs) in enumerate(outs):
        axis = batch_axis(s, t, b) if s is not None else None
        if needs and (axis is None or axis == INVALID):
            return None  # a differentiable output shared by the batch: its gradient is summed
        if needs and not _aligned(small.out_samples[i], big.out_samples[i], axis, b):
            return None
        out_axes.append(axis if axis != INVALID else None)
    return in_axes, out_axes


def build_plan(
    small: ProbeLog,
    big: ProbeLog,
    *,
    verified: bool,
    notes: list[str],
    checkable: bool = True,
    modes: tuple[bool, ...] = (),
    order: list[int] | None = None,
    force_direct: frozenset[int] = frozenset(),
) -> Plan:
    """Decide every use seen in the probe at the step's batch size (``small``).  ``modes``:
    the modules' ``training`` flags during the probe (a change means probing again);
    ``order``: the ids of the trainable parameters in model order; ``force_direct``: the ids
    of parameters to differentiate directly, every use of theirs (a step saw them get a
    gradient through a use no probe could see: an ``autograd.Function`` applied to the
    parameter itself, which no torch function mode intercepts)."""
    b = small.batch_size
    ops: dict[OpKey, Decision] = {}
    pending: dict[ScopeKey, list[OpRecord]] = {}
    for key, rec in small.ops.items():
        other = big.ops.get(key)
        same = other is not None and other.func is rec.func and other.touched == rec.touched
        if same and rec.rule is not None and key[0] != ROOT and not rec.touched & force_direct:
            if rec.rows is not None and other.rows is not None:
                source = _rows_source(small, big, rec.input_shape[0] // b)
                if source is not None and _sample_major(rec, other, b):
                    ops[key] = Decision(
                        "fuse", rec.touched, rec.func, rec.rule, rows=True, rows_from=source
                    )
                    continue
            else:
                axis = batch_axis(rec.input_shape, other.input_shape, b)
                if axis == 0 and _aligned(rec.samples, other.samples, 0, b):
                    ops[key] = Decision("fuse", rec.touched, rec.func, rec.rule)
                    continue
                if key in small.expand and axis is None and rec.input_shape[0] == 1:
                    ops[key] = Decision("fuse", rec.touched, rec.func, rec.rule, expand=True)
                    continue
        pending.setdefault(key[0], []).append(rec)

    direct: set[int] = set(force_direct)
    local: dict[ScopeKey, tuple[set[int], tuple]] = {}
    for scope, recs in pending.items():
        touched = set().union(*(r.touched for r in recs))
        srec = small.scopes.get(scope)
        axes = None if scope == ROOT else _local_axes(srec, big.scopes.get(scope), b)
        names = _names(srec.module) if srec is not None and srec.module is not None else {}
        if axes is None or not touched <= set(names):
            direct |= touched
        else:
            local[scope] = (touched, axes)
    while True:  # a call touching a directly differentiated parameter is direct: to a fixpoint
        grown = False
        for scope, (touched, _) in local.items():
            adopted = touched - direct
            for rec in pending[scope]:
                if not rec.touched <= adopted and not rec.touched <= direct:
                    direct |= rec.touched
                    grown = True
        if not grown:
            break
    scopes: dict[ScopeKey, LocalSpec] = {}
    for scope, (touched, (in_axes, out_axes)) in local.items():
        adopted = touched - direct
        if adopted:
            names = _names(small.scopes[scope].module)
            scopes[scope] = LocalSpec({i: names[i] for i in adopted}, in_axes, out_axes)
    for scope, recs in pending.items():
        spec = scopes.get(scope)
        for rec in recs:
            local_op = spec is not None and rec.touched <= set(spec.names)
            ops[rec.key] = Decision("local" if local_op else "direct", rec.touched, rec.func)
    # fused calls inside a re-run module call on the parameters it covers: re-run too
    for key, d in ops.items():
        spec = scopes.get(key[0])
        if d.kind == "fuse" and spec is not None and small.ops[key].touched <= set(spec.names):
            ops[key] = Decision("local", d.touched, d.func)
    calls: dict[int, int] = {}
    for mid, k in small.scopes:
        if mid != ROOT[0]:
            calls[mid] = max(calls.get(mid, 0), k + 1)
    rank = {pid: i for i, pid in enumerate(order or [])}
    direct_order = tuple(sorted(direct, key=lambda pid: rank.get(pid, len(rank))))
    return Plan(
        b,
        ops,
        scopes,
        frozenset(direct),
        verified,
        notes,
        checkable,
        calls,
        modes=modes,
        direct_order=direct_order,
    )


def _rows_source(small: ProbeLog, big: ProbeLog, per_sample: int) -> RowCount | None:
    """The batch's size that a flattened input's rows per sample equal in both probes (the
    first, by leaf and dimension), or None.  Fingerprints alone would also take rows gathered
    without padding (``h[mask]``) whenever the first sample holds the mean count, or a plan
    made on a batch with no padding; rows tied to a size of the batch's own tensors are
    checked again at every step (``GradCapture._fuse``), so a ragged gather re-plans."""
    for where, n in small.row_counts.items():
        if n == per_sample and big.row_counts.get(where) == n:
            return where
    return None


def _sample_major(small: OpRecord, big: OpRecord, b: int) -> bool:
    """Whether a flattened input holds each sample's rows together (sample-major), judged by
    per-sample fingerprints: the first ``b`` blocks equal the smaller probe's, the extra block
    equals its first sample's."""
    n, m = small.input_shape[0], big.input_shape[0]
    if n % b or m != n // b * (b + 1) or small.input_shape[1:] != big.input_shape[1:]:
        return False
    s, t = small.rows, big.rows
    tol = 1e-6 * (1 + s.abs())
    return bool(((t[:b] - s).abs() <= tol).all() and ((t[b] - s[0]).abs() <= tol[0]).all())


_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}  # else 1e-6


def sample_prints(x: Any, n: int, axes: tuple[int, ...] | None = None) -> dict[int, Tensor]:
    """Fingerprints of ``x`` along each axis that is ``n`` long (a candidate batch axis of a
    probe of ``n`` samples): ``(n, 4)``, per index the sum (plus the count of non-finite
    entries), the sum of squares and the sum of absolute values of the entries (clamped to
    ``1e30``), in float64, and the relative tolerance of ``x``'s dtype (an
    empty dict for anything but a real or integer tensor); ``axes``: only these axes."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.is_complex() or x.dtype == torch.bool:
        return {}
    out = {}
    tol = _TOL.get(x.dtype, 1e-6)
    with torch.no_grad(), torch._C.DisableTorchFunction():
        for axis, size in enumerate(x.shape):
            if size == n and (axes is None or axis in axes):
                r = x.detach().movedim(axis, 0).reshape(n, -1).double()
                bad = (~torch.isfinite(r)).sum(1).double()  # masks of -inf, finfo.min
                r = torch.nan_to_num(r, nan=0.0).clamp(-1e30, 1e30)
                sums = [r.sum(1) + bad, r.square().sum(1), r.abs().sum(1), r.new_full((n,), tol)]
                out[axis] = torch.stack(sums, 1).to(torch.float64)
    return out


def _aligned(small: dict[int, Tensor], big: dict[int, Tensor], axis: int, b: int) -> bool:
    """Whether the batch axis holds the samples in batch order in both probes: the ``B + 1``
    probe's first ``B`` fingerprints are the ``B`` probe's, its last the first sample's (within
    the dtype's tolerance, relative to the entries' magnitude: a reordered sample differs in
    every fingerprint, rounding does not depend on the batch size)."""
    s, t = small.get(axis), big.get(axis)
    if s is None or t is None or s.shape[0] != b or t.shape[0] != b + 1:
        return False
    s, t = s[:, :3], t[:, :3]
    scale = small[axis][:, 3:] * (1 + s[:, 1:2] + s[:, 2:3])
    return bool(((t[:b] - s).abs() <= scale).all() and ((t[b] - s[0]).abs() <= scale[0]).all())


def _names(module: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    return names
