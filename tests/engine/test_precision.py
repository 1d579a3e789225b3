"""training.precision on the CPU: autocast steps against the float32 loop, the fp16 loss scale
removed before clipping, overflowing samples dropped and charged, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain.cli import main
from dptrain.losses import classification_loss
from dptrain.precision import Precision, check_loss_scale, unscale
from dptrain.rundir import RunDir
from tests._support import (
    assert_close_rel,
    lm_batch,
    loop_per_sample_grads,
    make,
    snapshot,
    tiny_gpt2,
)
from tests.engine.test_engine import expected_step
from tests.run.test_train import tiny

TOL = {"bf16": 2e-2, "fp16": 5e-3}  # as tests/engine/harness.py: TOL_BF16, TOL_FP16


def test_precision_values():
    assert Precision().scale == 1.0 and Precision().autocast_dtype is None
    assert Precision("bf16").scale == 1.0 and Precision("bf16").autocast_dtype == torch.bfloat16
    assert Precision("fp16", 1024.0).scale == 1024.0
    assert Precision("fp16").describe() == {"precision": "fp16", "loss_scale": 4096.0}
    for bad in (0.0, 3.0, 1000.0, float("inf"), -2.0):
        with pytest.raises(ValueError, match="power of two"):
            check_loss_scale(bad)
    with pytest.raises(ValueError, match="precision must be"):
        Precision("fp8")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("clip", [0.05, 1e3])  # binding for every sample / for none
def test_autocast_step_matches_the_float32_loop(name, clip):
    """With clip 1e3 no unscaled gradient is clipped; were the fp16 gradients clipped while
    still scaled by S = 4096 (norms ~ 4096x), every sample would be, and the step would be
    far from the loop's."""
    torch.manual_seed(0)
    model = tiny_gpt2()
    batch = lm_batch(61, 4, 7, seed=2)
    want = expected_step(model, batch, {"all": clip}, lambda n: "all")
    before = snapshot(model)
    engine = make(model, clip=clip, n=4, q=1.0, precision=Precision(name))
    report = engine.step(batch)
    after = snapshot(model)
    assert report.nonfinite == 0 and report.applied
    for key, delta in want.items():
        assert_close_rel(before[key] - after[key], delta, rtol=TOL[name], what=f"{name} {key}")


def test_fp16_overflowing_samples_contribute_nothing_and_the_step_is_charged():
    """A sample whose float16 computation overflows (its input is beyond 65504) has a
    non-finite gradient: it is dropped, by its own gradient alone; the others are clipped and
    summed as usual, normalized by the public E[B]; the step is charged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(3, 4)
    x[0, 0] = 1e6
    y = torch.tensor([0, 1, 2])
    ref = loop_per_sample_grads(model, classification_loss, (x[1:], y[1:]))
    engine = make(
        model, clip=1e3, n=3, q=1.0, loss=classification_loss, precision=Precision("fp16")
    )
    before = snapshot(model)
    report = engine.step((x, y))
    assert report.nonfinite == 1 and report.applied and engine.ledger.total_steps == 1
    after = snapshot(model)
    names = {p: n for n, p in model.named_parameters()}
    for p, g in ref.items():
        want = g.sum(0) / 3.0  # unclipped (clip 1e3), E[B] = q N = 3
        name = names[p]
        assert_close_rel(before[name] - after[name], want, rtol=TOL["fp16"], what=name)


def test_unscale_divides_every_recorded_gradient():
    from dptrain.grad_sample import GradCapture
    from dptrain.losses import causal_lm_loss

    model = tiny_gpt2()
    batch = lm_batch(61, 2, 5, seed=0)
    cap = GradCapture(model)
    cap.attach()
    try:
        plain, _ = cap.run(causal_lm_loss, batch)
        scaled, _ = cap.run(Precision("fp16", 8.0).scaled(causal_lm_loss), batch)
    finally:
        cap.detach()
    back = unscale(scaled, 8.0)
    assert len(back.uses) == len(plain.uses) > 0
    for u, v in zip(back.uses, plain.uses, strict=True):
        grads = u.grad if isinstance(u.grad, list) else [u.grad]
        refs = v.grad if isinstance(v.grad, list) else [v.grad]
        for g, r in zip(grads, refs, strict=True):
            assert (g is None) == (r is None)
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


def test_tiny_run_in_bf16_with_gradient_checkpointing_on_the_cpu(tmp_path, capsys):
    recipe = tiny(
        tmp_path,
        training={
            "steps": 2,
            "device": "cpu",
            "precision": "bf16",
            "gradient_checkpointing": True,
            "checkpoint_every": 2,
        },
    )
    assert main(["train", str(recipe), "--no-progress"]) == 0
    meta = RunDir(tmp_path / "r").read_meta()
    assert meta["status"] == "finished" and meta["steps"] == 2
    assert meta["device"] == "cpu" and meta["precision"] == "bf16"
    assert "on cpu (" in capsys.readouterr().err


def test_build_model_enables_checkpointing_and_places_the_model(tmp_path):
    from dptrain.models import build_model
    from dptrain.recipe import load_recipe

    recipe = load_recipe(tiny(tmp_path), [f"training.gradient_checkpointing={'true'}"])
    model, _ = build_model(recipe, torch.device("meta"))
    assert model.base_model.model.is_gradient_checkpointing
    assert all(p.device.type == "meta" for p in model.parameters())
