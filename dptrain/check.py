"""The yardstick for the engine: an explicit per-example loop of clipped gradients.

For a batch of ``B`` samples, groups ``G`` (:func:`dptrain.groups.group_parameters`) with
thresholds ``C_g`` and expected batch size ``E``, the DP-SGD update before noise is

    u[p] = (1 / E) sum_b c_{g(p) b} grad_b[p],    c_gb = min(1, C_g / (||grad_b|_g|| + 1e-6))

where ``grad_b`` is the gradient of sample ``b``'s loss alone, computed here by a forward and
backward pass of a batch of one (:func:`per_sample_gradients`): no hooks, no engine, no
``torch.func``.  :func:`engine_update` takes one step of :class:`~dptrain.PrivacyEngine` with
noise 0 and reads the update it hands the optimizer; :func:`compare` gives the relative error
of the whole update ``||a - b|| / ||b||`` (the measure to judge by) and per parameter, to locate
a disagreement.  :class:`ExactnessCheck` does all three, for one or several steps, against a
float64 copy of the model.  The model must be deterministic (dropout off): the loop and the
engine must compute the same function; :class:`ExactnessCheck` verifies it on the first batch.

The engine's ``c_gb`` is this formula evaluated on a certified upper bound of the norm (float64
ghost norms plus their error bound, :mod:`dptrain.clipping`) and rounded toward zero into the
dtype it multiplies in (:func:`dptrain.clipping.clip_coef`): below the loop's by at most
``eta r^2 / 2`` (``r = S_b / ||G_b||``; about ``1e-13`` for the small models checked here,
under ``1e-6`` even for a GPT-2 LM head at ``r = 64``) plus one unit of that dtype (``2^-24``
in float32; three of float64 for a float64 model), inside the tolerances the update is
compared to (``1e-8`` for float64, :data:`dptrain.diagnose.TOLERANCE`).  The check's engine
gets no ``max_length``, so it never takes the float32 Grams of runs with a public length bound
(their over-clip, up to 0.8%, is outside these tolerances); those are tested against their
certified bound and a float64 reference in ``tests/engine/test_gram32.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import rng
from .batching import batch_len, batch_slice
from .groups import group_parameters, layer_of
from .losses import LossFn
from .policies import StaticPolicy, StepPlan, StepSums
from .policies.static import split_clip

TINY = 1e-30  # denominator floor of a relative error: a zero reference must be matched exactly


def group_clips(
    model: nn.Module, clip: float | dict[str, float], grouping: str = "flat"
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Groups (name -> parameter names) and per-group thresholds, split by the function
    :class:`~dptrain.StaticPolicy` splits with (:func:`~dptrain.policies.static.split_clip`):
    ``C_g = C / sqrt(G)`` for a total ``C``, or the given ``{group: C_g}`` (every group named)."""
    groups = group_parameters(model, grouping)
    if isinstance(clip, dict):
        missing = sorted(set(groups) - set(clip))
        if missing:
            raise ValueError(f"clip names no threshold for groups {missing}")
        return groups, split_clip(list(groups), math.sqrt(sum(c**2 for c in clip.values())), clip)
    return groups, split_clip(list(groups), float(clip))


def per_sample_gradients(model: nn.Module, batch: Any, loss_fn: LossFn) -> dict[str, Tensor]:
    """``{name: (B, *shape)}``: the gradient of each sample's loss alone (a batch of one, sliced
    with :func:`~dptrain.batching.batch_slice`), in float64, for every trainable parameter; a
    parameter the sample does not reach gets zeros.  Leaves every ``.grad`` as ``None``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows: dict[str, list[Tensor]] = {n: [] for n, _ in named}
    for _, p in named:
        p.grad = None
    try:
        for b in range(batch_len(batch)):
            loss = loss_fn(model, batch_slice(batch, b, b + 1))
            if loss.shape != (1,):
                raise ValueError(
                    f"loss_fn must return one loss per sample; on a batch of one it returned shape "
                    f"{tuple(loss.shape)}. Use reduction='none'."
                )
            loss.sum().backward()
            for n, p in named:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if g.is_sparse:  # an Embedding(sparse=True): the same gradient, dense
                    g = g.to_dense()
                rows[n].append(g.detach().to(torch.float64).clone())
                p.grad = None
    finally:
        for _, p in named:
            p.grad = None
    return {n: torch.stack(r) for n, r in rows.items()}


@dataclass
class Reference:
    """The loop's clipped update and what went into it."""

    update: dict[str, Tensor]  # (1 / E) sum_b c_gb grad_b[p], float64, by parameter name
    norms: dict[str, Tensor]  # per group, (B,): ||grad_b|_g|| before clipping
    clip: dict[str, float]  # C_g per group
    grads: dict[str, Tensor]  # per-sample gradients (B, *shape)

    @property
    def clipped_fraction(self) -> float:
        """Share of (sample, group) pairs whose norm exceeds the group's threshold."""
        flags = [self.norms[g] > c for g, c in self.clip.items()]
        if not flags:
            return 0.0
        allf = torch.cat(flags)
        return float(allf.double().mean()) if allf.numel() else 0.0


def clipped_update(
    grads: dict[str, Tensor],
    groups: dict[str, list[str]],
    clip: dict[str, float],
    expected_batch_size: float,
) -> Reference:
    """Clip per-sample gradients per group (the coefficient of :mod:`dptrain.clipping`), sum
    over samples and divide by ``expected_batch_size``."""
    batch = next(iter(grads.values())).shape[0] if grads else 0
    device = next(iter(grads.values())).device if grads else None
    update: dict[str, Tensor] = {}
    norms: dict[str, Tensor] = {}
    for g, names in groups.items():
        sq = torch.zeros(batch, dtype=torch.float64, device=device)
        for n in names:
            sq = sq + grads[n].reshape(batch, -1).pow(2).sum(1)  # scalar parameters: (B,)
        norms[g] = sq.sqrt()
        c = clip[g]
        coef = (
            torch.ones(batch, dtype=torch.float64, device=device)
            if math.isinf(c)
            else (c / (norms[g] + 1e-6)).clamp(max=1.0)
        )
        for n in names:
            update[n] = torch.einsum("b,b...->...", coef, grads[n]) / expected_batch_size
    return Reference(update=update, norms=norms, clip=dict(clip), grads=grads)


def reference_update(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    clip: float | dict[str, float],
    grouping: str = "flat",
    expected_batch_size: float | None = None,
) -> Reference:
    """The explicit per-example loop: per-sample gradients, per-group clipping at ``C_g``, the
    clipped sum divided by ``expected_batch_size`` (default: the batch size)."""
    groups, clips = group_clips(model, clip, grouping)
    grads = per_sample_gradients(model, batch, loss_fn)
    e = float(expected_batch_size if expected_batch_size is not None else batch_len(batch))
    return clipped_update(grads, groups, clips, e)


class _RecordingSGD(torch.optim.Optimizer):
    """SGD (no momentum, no weight decay) that keeps the gradient it is handed: the update."""

    def __init__(self, params: list[nn.Parameter], lr: float = 0.0) -> None:
        super().__init__(params, {"lr": lr})
        self.seen: dict[nn.Parameter, Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.seen = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.seen[p] = p.grad.detach().clone()
                if group["lr"]:
                    p.add_(p.grad, alpha=-group["lr"])


class _RecordingPolicy(StaticPolicy):
    """Static DP-SGD that keeps which samples the engine found within the clip, per group."""

    within: dict[str, Tensor] | None = None

    def release(self, sums: StepSums, plan: StepPlan, noise: Any) -> dict[nn.Parameter, Tensor]:
        self.within = {g: w.detach().clone() for g, w in (sums.within_clip or {}).items()}
        return super().release(sums, plan, noise)


@dataclass
class EngineUpdate:
    """What one engine step handed the optimizer."""

    update: dict[str, Tensor]  # by parameter name; empty if the step was not applied
    within_clip: dict[str, Tensor] | None  # per group, (B,): norm <= C_g, as the engine found
    report: Any  # the engine's StepReport


class EngineProbe:
    """A :class:`~dptrain.PrivacyEngine` with noise 0 whose optimizer records the update.

    ``lr`` is the SGD step applied after recording (0: the model does not move).  Extra keyword
    arguments go to the engine (``max_physical_batch_size``, ``ghost``, ...)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        clip: float | dict[str, float],
        grouping: str = "flat",
        expected_batch_size: float = 1.0,
        *,
        lr: float = 0.0,
        **engine_kwargs: Any,
    ) -> None:
        from .engine import PrivacyEngine

        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = {p: n for n, p in named}
        self.optimizer = _RecordingSGD([p for _, p in named], lr=lr)
        if isinstance(clip, dict):
            total = math.sqrt(sum(c**2 for c in clip.values()))
            self.policy = _RecordingPolicy(clip=total, noise_multiplier=0.0, group_clip=clip)
        else:
            self.policy = _RecordingPolicy(clip=clip, noise_multiplier=0.0)
        dataset_size = max(1, math.ceil(expected_batch_size))  # q N = E with q <= 1
        self.engine = PrivacyEngine(
            model,
            self.optimizer,
            policy=self.policy,
            sample_rate=expected_batch_size / dataset_size,
            dataset_size=dataset_size,
            loss_fn=loss_fn,
            grouping=grouping,
            **engine_kwargs,
        )

    def step(self, batch: Any) -> EngineUpdate:
        self.optimizer.seen = {}
        self.policy.within = None
        report = self.engine.step(batch)
        update = {self.names[p]: u for p, u in self.optimizer.seen.items()}
        return EngineUpdate(update=update, within_clip=self.policy.within, report=report)

    def close(self) -> None:
        self.engine.detach()


def engine_update(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    clip: float | dict[str, float],
    grouping: str = "flat",
    expected_batch_size: float | None = None,
    **engine_kwargs: Any,
) -> EngineUpdate:
    """One engine step with noise 0 on ``batch``; the model does not move and the engine's
    hooks are removed afterwards."""
    e = float(expected_batch_size if expected_batch_size is not None else batch_len(batch))
    probe = EngineProbe(model, loss_fn, clip, grouping, e, **engine_kwargs)
    try:
        return probe.step(batch)
    finally:
        probe.close()


@dataclass
class Comparison:
    """An update against the reference: the whole-update error and where it sits."""

    errors: dict[str, float]  # ||a_p - b_p|| / max(||b_p||, floor * ||b||), by parameter name
    missing: list[str] = field(default_factory=list)  # in the reference, not in the update
    extra: list[str] = field(default_factory=list)  # in the update, not in the reference
    total: float = 0.0  # ||a - b|| / ||b|| over all parameters concatenated

    @property
    def max_error(self) -> float:
        """The largest per-parameter error (inf when a parameter is missing or extra)."""
        if self.missing or self.extra:
            return math.inf
        return max(self.errors.values(), default=0.0)

    @property
    def worst(self) -> str | None:
        if self.missing:
            return self.missing[0]
        return max(self.errors, key=self.errors.__getitem__) if self.errors else None

    def ok(self, tol: float) -> bool:
        """The whole update within ``tol`` relative, and no parameter missing or extra."""
        return not self.missing and not self.extra and self.total <= tol

    def by_layer(self) -> dict[str, float]:
        """The largest relative error of each layer's parameters (LoRA A/B fold into the
        adapted layer, as in per-layer clipping)."""
        out: dict[str, float] = {}
        for n, e in self.errors.items():
            k = layer_of(n)
            out[k] = max(out.get(k, 0.0), e)
        for n in self.missing:
            out[layer_of(n)] = math.inf
        return out

    def summary(self, top: int = 3) -> str:
        if self.missing:
            return (
                f"total {self.total:.1e}; no update for {len(self.missing)} parameters, "
                f"e.g. {self.missing[:top]}"
            )
        if self.extra:
            return f"update for parameters the reference does not train: {self.extra[:top]}"
        worst = sorted(self.errors.items(), key=lambda kv: -kv[1])[:top]
        parts = ", ".join(f"{n} {e:.1e}" for n, e in worst)
        return f"total {self.total:.1e}; worst {parts}"


def compare(
    actual: dict[str, Tensor], expected: dict[str, Tensor], floor: float = 0.0
) -> Comparison:
    """Errors of ``actual`` against ``expected``, in float64.

    ``total = ||a - b|| / ||b||`` over all parameters concatenated (a parameter missing from
    ``actual`` counts as zero): the measure to judge by, since a parameter whose true update is
    (near) zero in exact arithmetic, e.g. an attention key bias, has a meaningless relative error
    of its own.  ``errors[p] = ||a_p - b_p|| / max(||b_p||, floor * ||b||, TINY)`` locates the
    disagreement."""
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    sq_ref = sum(float(b.double().pow(2).sum()) for b in expected.values())
    ref_norm = math.sqrt(sq_ref)
    errors: dict[str, float] = {}
    sq_diff = 0.0
    for n, b in expected.items():
        b = b.detach().to(torch.float64).cpu()
        if n not in actual:
            sq_diff += float(b.pow(2).sum())
            continue
        a = actual[n].detach().to(torch.float64).cpu().reshape(b.shape)
        diff = float((a - b).norm())
        sq_diff += diff**2 if math.isfinite(diff) else math.inf
        den = max(float(b.norm()), floor * ref_norm, TINY)
        errors[n] = diff / den if math.isfinite(diff) else math.inf
    total = math.sqrt(sq_diff) / max(ref_norm, TINY)
    return Comparison(errors=errors, missing=missing, extra=extra, total=total)


@torch.no_grad()
def _check_deterministic(model: nn.Module, batch: Any, loss_fn: LossFn) -> None:
    """Two evaluations of the losses must agree: a random model (dropout in train mode) cannot
    be compared with anything."""
    with rng.GLOBAL_RNG:
        state = torch.random.get_rng_state()
        try:
            first, second = loss_fn(model, batch), loss_fn(model, batch)
        finally:
            torch.random.set_rng_state(state)
    if torch.equal(first.isnan(), second.isnan()) and torch.equal(
        first.nan_to_num(), second.nan_to_num()
    ):
        if first.isnan().any():  # NaN != NaN: not a random model, one without a loss to check
            bad = first.isnan().nonzero().flatten().tolist()
            raise ValueError(
                f"the losses of samples {bad[:8]} of the batch are NaN (the same in both "
                "evaluations), so the loop has no gradient to compare the engine with. Fix: "
                "check those samples (a fully masked attention row, e.g. padding beyond a "
                "sliding window, is NaN in eager attention)"
            )
        return
    if not torch.equal(first, second):
        raise ValueError(
            "the model's losses differ between two evaluations of the same batch (dropout or "
            "another random layer is active), so the engine cannot be compared with the loop. "
            "Fix: set every dropout probability to 0 (or call .eval() on the dropout layers)"
        )


def cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """``batch`` with its floating-point tensors cast to ``dtype`` (ids and masks unchanged)."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cast_floats(v, dtype) for v in batch)
    return batch


@dataclass
class CheckReport:
    """One step of the engine against the loop."""

    comparison: Comparison
    reference: Reference
    engine: EngineUpdate

    @property
    def clip_agreement(self) -> float | None:
        """Share of (sample, group) pairs that the engine and the loop both find within the
        clip, or both outside it (None when the engine does not say)."""
        w = self.engine.within_clip
        if not w:
            return None
        same = [
            (w[g].cpu() == (self.reference.norms[g] <= c)).double()
            for g, c in self.reference.clip.items()
            if g in w and w[g].shape == self.reference.norms[g].shape
        ]
        return float(torch.cat(same).mean()) if same else None


class ExactnessCheck:
    """The engine on ``model`` against the loop on a ``reference_dtype`` copy of it.

    Before each step the copy is loaded with the model's current state, so a check of several
    steps compares each one where the engine actually is.  The engine gets the batch with its
    floating-point tensors in the model's dtype; ``autocast`` runs the engine's step (never the
    loop) under ``torch.autocast(device, autocast)``.  ``clip="auto"`` sets every group's
    threshold to half the median per-sample group norm of the first batch (so most samples are
    clipped; the engine is then built at the first step).  Build the check before anything else
    wraps the model: the copy is taken here."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        clip: float | dict[str, float] | str,
        grouping: str = "flat",
        expected_batch_size: float = 1.0,
        *,
        reference_dtype: torch.dtype = torch.float64,
        autocast: torch.dtype | None = None,
        lr: float = 0.0,
        **engine_kwargs: Any,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.grouping = grouping
        self.expected_batch_size = float(expected_batch_size)
        self.reference_dtype = reference_dtype
        self.autocast = autocast
        self.lr = lr
        self.engine_kwargs = engine_kwargs
        self.reference_model = copy.deepcopy(model).to(reference_dtype)
        self.groups = group_parameters(self.reference_model, grouping)
        self.clip: dict[str, float] | None = None
        if clip != "auto":
            if isinstance(clip, str):
                raise ValueError(f"clip must be a number, a dict or 'auto', got {clip!r}")
            self.clip = group_clips(self.reference_model, clip, grouping)[1]
        self.probe: EngineProbe | None = None

    def reference(self, batch: Any) -> Reference:
        """The loop's clipped update at the model's current weights (sets ``clip`` if auto)."""
        self.reference_model.load_state_dict(self.model.state_dict())
        if self.probe is None:
            _check_deterministic(
                self.reference_model, cast_floats(batch, self.reference_dtype), self.loss_fn
            )
        grads = per_sample_gradients(
            self.reference_model, cast_floats(batch, self.reference_dtype), self.loss_fn
        )
        if self.clip is None:
            norms = clipped_update(grads, self.groups, dict.fromkeys(self.groups, math.inf), 1.0)
            half = 0.5 * float(torch.cat(list(norms.norms.values())).median())
            if not half > 0:
                raise ValueError(
                    "every per-sample gradient of the first batch is zero: the check would "
                    "compare nothing. Fix: use a batch (or model) whose loss has a gradient"
                )
            self.clip = dict.fromkeys(self.groups, half)
        return clipped_update(grads, self.groups, self.clip, self.expected_batch_size)

    def engine_step(self, batch: Any) -> EngineUpdate:
        """One engine step (the engine is built on the first call, once ``clip`` is known)."""
        if self.clip is None:
            raise ValueError("clip='auto' is set by the first reference(): call it first")
        if self.probe is None:
            self.probe = EngineProbe(
                self.model,
                self.loss_fn,
                self.clip,
                self.grouping,
                self.expected_batch_size,
                lr=self.lr,
                **self.engine_kwargs,
            )
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if dtype is not None:
            batch = cast_floats(batch, dtype)
        with self._autocast():
            return self.probe.step(batch)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast)

    def step(self, batch: Any, floor: float = 0.0) -> CheckReport:
        ref = self.reference(batch)
        got = self.engine_step(batch)
        return CheckReport(compare(got.update, ref.update, floor), ref, got)

    def steps(self, batches: list[Any], floor: float = 0.0) -> Iterator[CheckReport]:
        for batch in batches:
            yield self.step(batch, floor)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
