"""``dptrain check``: the engine against the explicit per-example loop, on the user's own model
and records, before any budget is spent.

For each batch, :class:`~dptrain.check.ExactnessCheck` takes one engine step with noise 0 and
compares the update it hands the optimizer with the loop's clipped update
``(1 / E) sum_b min(1, C_g / (||g_b|_g|| + 1e-6)) g_b`` on a float64 copy of the model, with
``C_g`` half the median per-sample group norm of the first batch (so clipping binds).  Dropout
is switched off in both (they must compute the same function).  The report gives, per layer,
the rule the engine planned (fused closed form, re-run per sample, or the slow per-sample
backward), the largest relative error over the batches, and the verdict; or the engine's
refusal (a layer that mixes samples) with its fix.

The numbers are functions of the records used, without noise: they are for the user who owns
those records, not for publication.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .batching import batch_len
from .check import ExactnessCheck, compare, engine_update
from .data.loading import DataError
from .errors import InputError
from .grad_sample import UnsupportedLayerError
from .grad_sample.capture import _DROPOUT, _DROPOUT_RAW, _without_dropout
from .groups import layer_of
from .losses import LossFn

# relative tolerance on the whole update, by the dtype the engine runs in (the loop is float64):
# a few units of roundoff of that dtype, the tolerances of the exactness matrix (the engine's
# certified clip coefficient is below the loop's by far less than these: see dptrain.check)
TOLERANCE = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}


class _NoDropout(TorchFunctionMode):
    """Every dropout (and scaled-dot-product-attention's ``dropout_p``) as the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _DROPOUT or func in _DROPOUT_RAW or func is F.scaled_dot_product_attention:
            args, kwargs, _ = _without_dropout(func, tuple(args), kwargs)
        return func(*args, **kwargs)


@contextmanager
def no_dropout() -> Iterator[None]:
    """Run a model deterministically: dropout layers and functions pass their input through."""
    with _NoDropout():
        yield


@dataclass
class LayerResult:
    """One layer (a module owning trainable parameters; LoRA A/B fold into the adapted layer)."""

    layer: str
    rule: str  # how its per-sample gradients are formed
    error: float  # largest relative error of its parameters' updates over the batches
    parameters: int  # number of trainable scalars

    def ok(self, tol: float) -> bool:
        return self.error <= tol


@dataclass
class CheckResult:
    """The whole check: per-layer rows, the whole-update error, or the engine's refusal."""

    dtype: str
    tolerance: float
    batches: list[int]  # sizes
    layers: list[LayerResult] = field(default_factory=list)
    total_error: float = math.nan  # worst over batches of ||u_engine - u_loop|| / ||u_loop||
    clipped_fraction: float = math.nan  # of (sample, group) pairs in the first batch
    refusal: str | None = None

    @property
    def exact(self) -> bool:
        return self.refusal is None and self.total_error <= self.tolerance

    @property
    def slow(self) -> list[str]:
        """Layers on the slow path (one backward per sample)."""
        return [r.layer for r in self.layers if "autograd" in r.rule]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exact"] = self.exact
        return out

    def render(self) -> str:
        """A plain-text table: layer, rule, error, verdict, then the verdict of the check."""
        lines = [
            f"engine vs per-example loop: {len(self.batches)} batches of {self.batches} records, "
            f"engine in {self.dtype}, loop in float64, tolerance {self.tolerance:.0e}"
        ]
        if self.refusal is not None:
            lines.append(f"REFUSED: {self.refusal}")
            return "\n".join(lines)
        width = max((len(r.layer) for r in self.layers), default=5)
        rw = max((len(r.rule) for r in self.layers), default=4)
        lines.append(f"{'layer':<{width}}  {'rule':<{rw}}  {'error':>8}  verdict")
        for r in self.layers:
            verdict = "ok" if r.ok(self.tolerance) or self.exact else "WRONG"
            lines.append(f"{r.layer:<{width}}  {r.rule:<{rw}}  {r.error:8.1e}  {verdict}")
        lines.append(
            f"whole update: relative error {self.total_error:.1e} "
            f"({self.clipped_fraction:.0%} of the first batch's samples clipped)"
        )
        if self.slow:
            lines.append(
                f"slow path (one backward per sample, exact): {len(self.slow)} layers, e.g. "
                f"{self.slow[:3]}"
            )
        lines.append(
            "exact: the engine's clipped update equals the loop's"
            if self.exact
            else "NOT EXACT: do not train this model with dptrain; please report it"
        )
        return "\n".join(lines)


def _engine_attached(model: nn.Module) -> bool:
    """Whether a :class:`~dptrain.PrivacyEngine`'s capture hooks are on ``model``."""
    from .grad_sample.capture import GradCapture

    return any(
        isinstance(getattr(hook, "__self__", None), GradCapture)
        for m in model.modules()
        for hook in m._forward_pre_hooks.values()
    )


def check_model(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    grouping: str = "flat",
    tolerance: float | None = None,
    **engine_kwargs: Any,
) -> CheckResult:
    """Check the engine on ``model`` (left with its weights and buffers as they were).

    ``loss_fn(model, batch)`` returns one loss per sample; ``batches`` are what the engine's
    ``step`` would get.  ``tolerance`` defaults to :data:`TOLERANCE` of the model's dtype;
    ``engine_kwargs`` go to :class:`~dptrain.PrivacyEngine` (``max_physical_batch_size`` ...)."""
    if not batches:
        raise ValueError("check_model needs at least one batch of records")
    if _engine_attached(model):
        raise InputError(
            "check_model: the model is attached to a PrivacyEngine (its hooks are on the "
            "model). Fix: call check_model before creating the engine, or engine.detach() first"
        )
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tol = TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
    result = CheckResult(str(dtype).removeprefix("torch."), tol, [batch_len(b) for b in batches])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with no_dropout():
        check = ExactnessCheck(model, loss_fn, "auto", grouping, 1.0, **engine_kwargs)
        worst: dict[str, float] = {}
        try:
            for i, batch in enumerate(batches):
                try:
                    ref = check.reference(batch)
                except (
                    Exception
                ):  # a batch of one may not run (batch norm): does the engine refuse?
                    result.refusal = _refusal(model, loss_fn, batch, grouping, engine_kwargs)
                    if result.refusal is None:
                        raise
                    return result
                if i == 0:
                    result.clipped_fraction = ref.clipped_fraction
                try:
                    got = check.engine_step(batch)
                except UnsupportedLayerError as err:
                    result.refusal = str(err)
                    return result
                cmp = compare(got.update, ref.update)
                result.total_error = max(
                    cmp.total, 0.0 if math.isnan(result.total_error) else result.total_error
                )
                for layer, e in cmp.by_layer().items():
                    worst[layer] = max(worst.get(layer, 0.0), e)
            rules = check.probe.engine.capture.describe() if check.probe is not None else {}
        finally:
            check.close()
            model.load_state_dict(state)
    sizes: dict[str, int] = {}
    how: dict[str, set[str]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            k = layer_of(n)
            sizes[k] = sizes.get(k, 0) + p.numel()
            how.setdefault(k, set()).add(rules.get(n, "?"))
    result.layers = [
        LayerResult(k, ", ".join(sorted(how[k])), worst.get(k, math.inf), sizes[k]) for k in sizes
    ]
    return result


def _refusal(
    model: nn.Module, loss_fn: LossFn, batch: Any, grouping: str, engine_kwargs: dict[str, Any]
) -> str | None:
    """The engine's refusal of ``batch``, or None if it takes the step."""
    try:
        engine_update(model, batch, loss_fn, 1.0, grouping, **engine_kwargs)
    except UnsupportedLayerError as err:
        return str(err)
    return None


def check_recipe(recipe: Any, *, records: int = 8, batch_size: int = 4) -> CheckResult:
    """Check the engine on a recipe's model (with its LoRA, dtype, grouping, physical batch
    size, device and precision) and its first ``records`` training records, in batches of
    ``batch_size``; under bf16/fp16 autocast the tolerance is that of the autocast dtype."""
    from .data import TextDataset
    from .hardware import resolve_device, to_device
    from .models import check_context
    from .precision import Precision
    from .tasks import task_for

    if records < 1 or batch_size < 1:
        raise InputError(f"records and batch_size must be >= 1, got {records} and {batch_size}")
    d = recipe.data
    task = task_for(recipe)  # the recipe's records, model head and loss (dptrain.tasks)
    texts = task.load(d.path, d.text_field, d.format, text_records=d.text_records)
    if len(texts) == 0:
        raise DataError(f"{d.path} holds no records; fix data.path")
    device = resolve_device(recipe.training.device)
    precision = Precision(recipe.training.precision, recipe.training.loss_scale)
    model, tokenizer = task.build_model(recipe)
    model.to(device)
    check_context(model, d.max_length)
    head = TextDataset(texts.texts[:records], texts.ids[:records])
    ex = task.encode(head, tokenizer, d.max_length)
    batches = [
        to_device(ex.batch(list(range(i, min(i + batch_size, len(ex))))), device)
        for i in range(0, len(ex), batch_size)
    ]
    autocast = precision.autocast_dtype
    result = check_model(
        model,
        task.loss_fn,
        batches,
        grouping=recipe.policy.grouping,
        tolerance=TOLERANCE[autocast] if autocast is not None else None,
        max_physical_batch_size=recipe.training.physical_batch_size,
        precision=precision,
    )
    if result.refusal is None:
        result.refusal = padding_refusal(
            model, task.loss_fn, batches[0], ex.pad, d.max_length, precision
        )
    return result


def padding_refusal(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    pad: Any,
    max_length: int,
    precision: Any = None,
) -> str | None:
    """The refusal of ``dptrain train``'s padding probe (``PrivacyEngine(max_length=L,
    pad=...)``: outputs that follow the batch's padded length), or None.  The check's own
    engine gets no ``max_length`` (its float32 Grams would be outside the check's tolerances),
    so this runs the probe alone, on the first batch, under the run's precision; the model is
    left as it was (the probe restores what it changes)."""
    from .grad_sample import GradCapture
    from .hardware import module_device

    device = module_device(model)
    autocast = precision.autocast(device) if precision is not None else nullcontext()
    capture = GradCapture(model)
    capture.attach()
    capture.padding = (pad, max_length)
    try:
        with no_dropout(), autocast:
            capture.probe(loss_fn, batch)
    except UnsupportedLayerError as err:
        return str(err)
    finally:
        capture.detach()
    return None
