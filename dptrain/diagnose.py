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

**Neighbours.**  Given how batches are formed (``collate(indices)``: the records padded into
a batch as the training loop does), the check also tests the contract itself: for a batch
``I`` and its longest and shortest record ``y``, the engine's noise-free clipped sums must
satisfy ``S(I) = S(I - {y}) + S({y})``, with ``{y}`` collated alone at its own length.  The
loop above cannot see a model whose samples depend on the batch's padded length (its batch
of one keeps the padding; so do the engine's probes): dynamic rope scaling past
``max_position_embeddings``, left padding with absolute positions, a mean over padded
positions.  Removing the record that sets the padded length changes the others' clipped
gradients there, so the difference of the sums is no longer one record's clipped gradient
and the sensitivity the accountant assumes does not hold.

The numbers are functions of the records used, without noise: they are for the user who owns
those records, not for publication.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
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
class NeighbourResult:
    """One neighbour test: batch ``batch`` without its ``which`` record (``longest`` or
    ``shortest``), ``error = ||S(I) - S(I - y) - S(y)|| / (||S(I)|| + ||S(I - y)||)``."""

    batch: int
    which: str
    record: int  # the record's index among the checked ones
    error: float


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
    neighbours: list[NeighbourResult] = field(default_factory=list)

    @property
    def neighbour_error(self) -> float:
        """The worst neighbour test's error (0 when none ran)."""
        return max((n.error for n in self.neighbours), default=0.0)

    @property
    def exact(self) -> bool:
        return (
            self.refusal is None
            and self.total_error <= self.tolerance
            and self.neighbour_error <= self.tolerance
        )

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
        if self.neighbours:
            worst = max(self.neighbours, key=lambda n: n.error)
            ok = worst.error <= self.tolerance
            lines.append(
                f"neighbours: a batch's sum without its longest / shortest record plus that "
                f"record's alone: worst error {worst.error:.1e} over {len(self.neighbours)} "
                f"tests{'' if ok else f' (batch {worst.batch}, its {worst.which} record)'}  "
                f"{'ok' if ok else 'WRONG'}"
            )
            if not ok:
                lines.append(
                    "  a sample's clipped gradient depends on the other records of its batch "
                    "(e.g. on the batch's padded length: dynamic rope scaling, left padding, a "
                    "mean over padded positions): adding or removing one record moves the "
                    "others' gradients, so the sensitivity the accountant assumes does not hold"
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
    collate: Callable[[Sequence[int]], Any] | None = None,
    **engine_kwargs: Any,
) -> CheckResult:
    """Check the engine on ``model`` (left with its weights and buffers as they were).

    ``loss_fn(model, batch)`` returns one loss per sample; ``batches`` are what the engine's
    ``step`` would get, or, with ``collate``, lists of record indices that ``collate(indices)``
    turns into such batches (as the training loop forms them); the neighbour tests then run
    too (see the module's docstring).  ``tolerance`` defaults to :data:`TOLERANCE` of the model's dtype;
    ``engine_kwargs`` go to :class:`~dptrain.PrivacyEngine` (``max_physical_batch_size`` ...)."""
    if not batches:
        raise ValueError("check_model needs at least one batch of records")
    index_batches = [list(i) for i in batches] if collate is not None else []
    if collate is not None:
        batches = [collate(i) for i in index_batches]
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
            if collate is not None:
                result.neighbours = _neighbour_tests(check, collate, index_batches)
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


def _neighbour_tests(
    check: ExactnessCheck, collate: Callable[[Sequence[int]], Any], index_batches: list[list[int]]
) -> list[NeighbourResult]:
    """For each batch of two or more records, its longest and shortest record ``y`` (by the
    size of ``y`` collated alone): the error of ``S(I) = S(I - y) + S(y)`` in the engine's
    noise-free clipped sums (the check's engine: its clip, expected batch size 1)."""

    def clipped_sum(indices: list[int]) -> Tensor | None:
        update = check.engine_step(collate(indices)).update
        if not update:  # not applied: a non-finite sum
            return None
        return torch.cat([update[n].double().reshape(-1).cpu() for n in sorted(update)])

    out: list[NeighbourResult] = []
    for k, indices in enumerate(index_batches):
        if len(indices) < 2:
            continue
        sizes = {i: _numel(collate([i])) for i in indices}
        ends = {"longest": max(indices, key=sizes.__getitem__)}
        shortest = min(indices, key=sizes.__getitem__)
        if shortest != ends["longest"]:
            ends["shortest"] = shortest
        whole = clipped_sum(indices)
        for which, y in ends.items():
            rest = clipped_sum([i for i in indices if i != y])
            alone = clipped_sum([y])
            if whole is None or rest is None or alone is None:
                error = math.inf
            else:
                scale = float(whole.norm() + rest.norm())
                error = float((whole - rest - alone).norm()) / scale if scale > 0 else 0.0
            out.append(NeighbourResult(k, which, y, error))
    return out


def _numel(batch: Any) -> int:
    """The number of elements of a batch's tensors (a padded record's footprint)."""
    if isinstance(batch, Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        return sum(_numel(v) for v in batch.values())
    if isinstance(batch, (tuple, list)):
        return sum(_numel(v) for v in batch)
    return 0


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
    batches = [list(range(i, min(i + batch_size, len(ex)))) for i in range(0, len(ex), batch_size)]
    autocast = precision.autocast_dtype

    def collate(indices: Sequence[int]) -> Any:
        return to_device(ex.batch(list(indices)), device)

    result = check_model(
        model,
        task.loss_fn,
        batches,
        collate=collate,
        grouping=recipe.policy.grouping,
        tolerance=TOLERANCE[autocast] if autocast is not None else None,
        max_physical_batch_size=recipe.training.physical_batch_size,
        precision=precision,
    )
    if result.refusal is None:  # the train engine's probe up to max_length (the neighbour
        # tests above see the padded length only where these records' lengths straddle a bound)
        result.refusal = padding_refusal(
            model, task.loss_fn, collate(batches[0]), ex.pad, d.max_length, precision
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
