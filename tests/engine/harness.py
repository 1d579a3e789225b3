"""Run one case of the exactness matrix and say what happened: pass, wrong, crash or refused.

The engine is used through its public API only (:class:`dptrain.check.ExactnessCheck`), so the
matrix judges any engine.  An outcome is recorded for the table (``EXACTNESS.md``) before the
test asserts, so a failing case still reports its error, exception or refusal.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dptrain import UnsupportedLayerError
from dptrain.check import ExactnessCheck, compare

from .builders import Case

TOL = 1e-5  # float64: the whole clipped update, relative
# half precision against the float64 loop on the same weights: a few units of roundoff
# (u = 2^-8 for bfloat16, 2^-11 for float16); the exact engine measures up to 8e-3 and 1e-3
TOL_BF16 = 2e-2  # bf16 weights, or float32 weights under torch.autocast(bfloat16)
TOL_FP16 = 5e-3
EXPECTED_BATCH_SIZE = 2.0  # E = q N, public; the same for every step of a case
REFUSE_CLIP = 0.1  # refusal cases have no reference (a batch of one cannot go through them)


@dataclass
class Outcome:
    """``status``: pass | wrong | crash | refused | accepted (a refusal case that was not)."""

    status: str
    detail: str
    passed: bool
    error: float | None = None  # whole-update relative error of the worst step

    def cell(self) -> str:
        """One table cell."""
        if self.status == "pass":
            return f"pass ({self.error:.0e})"
        return f"{self.status}: {self.detail}"


def _first_line(e: BaseException, limit: int = 160) -> str:
    line = next((s for s in str(e).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _where(e: BaseException) -> str:
    """The innermost frame of the traceback inside dptrain (where the engine gave up)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/dptrain/" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" [{f.filename.split('/dptrain/')[-1]}:{f.lineno}]"


def _refusal_ok(e: BaseException, case: Case, model: nn.Module) -> str | None:
    """Why the refusal ``e`` of ``case`` is not a good one (None if it is)."""
    if not isinstance(e, (UnsupportedLayerError, ValueError)):
        return f"{type(e).__name__} is neither UnsupportedLayerError nor ValueError"
    msg = str(e)
    assert case.refuse is not None
    cls = type(model.get_submodule(case.refuse)).__name__
    if f"'{case.refuse}'" not in msg and cls not in msg:
        return f"the message names neither layer '{case.refuse}' nor {cls}"
    if "fix" not in msg.lower():
        return "the message names no fix"
    if "requires_grad_(False)" in msg:
        return "the fix suggests freezing, but a frozen layer in train mode still mixes samples"
    return None


def run_case(
    case: Case,
    *,
    sizes: Sequence[int] = (3,),
    seed: int = 0,
    grouping: str = "flat",
    tol: float = TOL,
    transform: Callable[[nn.Module], nn.Module] | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    autocast: torch.dtype | None = None,
    lr: float = 0.0,
    clip: float | str = "auto",
    **engine_kwargs: Any,
) -> Outcome:
    """Steps of the engine on batches of ``sizes`` against the float64 loop.

    ``transform`` (LoRA, a dtype) is applied to the built model before the loop's copy is taken;
    ``prepare`` (gradient checkpointing) after it, so the loop runs without it.  ``lr`` > 0 moves
    the model between steps.  Clipping is at half the median per-sample norm of the first batch,
    or at ``clip`` (a number: a large one makes clipping the identity)."""
    model = case.build()
    if transform is not None:
        model = transform(model)
    if case.refuse is not None:
        return _run_refusal(case, model, sizes, seed, grouping, engine_kwargs)
    check = ExactnessCheck(
        model,
        case.loss,
        clip,
        grouping,
        EXPECTED_BATCH_SIZE,
        autocast=autocast,
        lr=lr,
        **engine_kwargs,
    )
    if prepare is not None:
        prepare(model)
    worst = 0.0
    try:
        for i, size in enumerate(sizes):
            batch = case.batch(size, seed + i)
            ref = check.reference(batch)  # the yardstick's own errors are test errors
            if i == 0 and clip == "auto":
                assert ref.clipped_fraction >= 0.5, (
                    f"only {ref.clipped_fraction:.0%} of the samples are clipped"
                )
                unused = [n for n, g in ref.grads.items() if not g.any()]
                assert not unused, f"the case trains parameters the loss never reaches: {unused}"
            try:
                got = check.engine_step(batch)
            except UnsupportedLayerError as e:
                return Outcome("refused", f"{_first_line(e)}{_where(e)}", False)
            except Exception as e:
                return Outcome("crash", f"{type(e).__name__}: {_first_line(e)}{_where(e)}", False)
            cmp = compare(got.update, ref.update)
            if not cmp.ok(tol):
                step = f"step {i + 1} (B={size}): " if len(sizes) > 1 else ""
                return Outcome("wrong", step + cmp.summary(), False, cmp.total)
            worst = max(worst, cmp.total)
    finally:
        check.close()
    return Outcome("pass", f"{worst:.1e}", True, worst)


def _run_refusal(
    case: Case,
    model: nn.Module,
    sizes: Sequence[int],
    seed: int,
    grouping: str,
    engine_kwargs: dict[str, Any],
) -> Outcome:
    """The engine must refuse before the step is taken, and leave every buffer untouched (no
    running statistic of private data may reach the model)."""
    before = {n: b.clone() for n, b in model.named_buffers()}
    check = ExactnessCheck(
        model, case.loss, REFUSE_CLIP, grouping, EXPECTED_BATCH_SIZE, **engine_kwargs
    )
    try:
        for i, size in enumerate(sizes):
            check.engine_step(case.batch(size, seed + i))
    except Exception as e:
        changed = [n for n, b in model.named_buffers() if not torch.equal(b, before[n])]
        why = _refusal_ok(e, case, model)
        if why is None and changed:
            why = f"only after a forward that updated {changed} from private data"
        detail = f"{type(e).__name__}: {_first_line(e)}"
        return Outcome("refused", detail if why is None else f"{why}; {detail}", why is None)
    finally:
        check.close()
    return Outcome("accepted", "took the step without refusing", False)
