"""The yardstick itself (dptrain.check): the loop against closed forms, and the comparison."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dptrain.check import ExactnessCheck, compare, engine_update, reference_update
from dptrain.losses import mse_loss


def _linear_batch(b: int = 4):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(b, 3, generator=g, dtype=torch.float64)


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3).double()


@pytest.mark.parametrize("grouping", ["flat", "per_param"])
def test_reference_is_the_closed_form_for_a_linear_layer(grouping):
    """loss_b = ||W x_b + c - y_b||^2: grad_W = 2 r_b x_b^T, grad_c = 2 r_b."""
    model, (x, y) = _linear(), _linear_batch()
    with torch.no_grad():
        r = model(x) - y
    gw, gc = 2 * torch.einsum("bo,bi->boi", r, x), 2 * r
    clip, e = 0.5, 2.5
    if grouping == "flat":
        norm = (gw.flatten(1).pow(2).sum(1) + gc.pow(2).sum(1)).sqrt()
        cw = cc = (clip / (norm + 1e-6)).clamp(max=1)
    else:  # C_g = C / sqrt(2) per parameter
        each = clip / math.sqrt(2)
        cw = (each / (gw.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1)
        cc = (each / (gc.norm(dim=1) + 1e-6)).clamp(max=1)
    ref = reference_update(model, (x, y), mse_loss, clip, grouping, expected_batch_size=e)
    torch.testing.assert_close(ref.update["weight"], torch.einsum("b,boi->oi", cw, gw) / e)
    torch.testing.assert_close(ref.update["bias"], torch.einsum("b,bo->o", cc, gc) / e)
    assert ref.clipped_fraction > 0.5
    assert all(p.grad is None for p in model.parameters())


def test_compare_judges_the_whole_update():
    f64 = torch.float64
    b = {"big": torch.tensor([3.0, 4.0], dtype=f64), "zero": torch.zeros(2, dtype=f64)}
    near = {
        "big": torch.tensor([3.0, 4.0 + 5e-7], dtype=f64),
        "zero": torch.tensor([1e-9, 0.0], dtype=f64),
    }
    cmp = compare(near, b)
    assert cmp.ok(1e-6) and cmp.total == pytest.approx(math.hypot(5e-7, 1e-9) / 5)
    assert cmp.errors["zero"] > 1e15  # per parameter: rounding noise over a zero reference
    missing = compare({"big": b["big"]}, {"big": b["big"], "other": torch.ones(1)})
    assert not missing.ok(0.1) and missing.missing == ["other"]
    assert missing.total == pytest.approx(1 / math.sqrt(26))


def test_random_models_are_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    check = ExactnessCheck(model, mse_loss, "auto", expected_batch_size=2.0)
    with pytest.raises(ValueError, match="dropout"):
        check.reference(_linear_batch())


def test_engine_on_a_linear_model_matches_the_loop():
    """A model every engine handles: the probe reads the update and the clip flags."""
    model, batch = _linear(), _linear_batch()
    ref = reference_update(model, batch, mse_loss, 0.5, expected_batch_size=2.0)
    got = engine_update(model, batch, mse_loss, 0.5, expected_batch_size=2.0)
    assert compare(got.update, ref.update).ok(1e-5)
    assert got.within_clip is not None
    assert torch.equal(got.within_clip["all"].cpu(), ref.norms["all"] <= 0.5)
    before = [p.detach().clone() for p in model.parameters()]
    engine_update(model, batch, mse_loss, 0.5)  # lr 0: the model does not move
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("grouping", ["flat", "per_param"])
@pytest.mark.parametrize("clip", [0.7, "dict"])
def test_the_loop_splits_the_clip_as_the_static_policy_binds_it(grouping, clip):
    """One split (policies.static.split_clip): the yardstick's thresholds are the policy's."""
    from dptrain import StaticPolicy
    from dptrain.check import group_clips

    model = _linear()
    groups = list(group_clips(model, 1.0, grouping)[0])
    given = {g: 0.3 + 0.1 * i for i, g in enumerate(groups)} if clip == "dict" else clip
    _, clips = group_clips(model, given, grouping)
    if clip == "dict":
        policy = StaticPolicy(clip=1.0, noise_multiplier=1.0, group_clip=given)
    else:
        policy = StaticPolicy(clip=clip, noise_multiplier=1.0)
    policy.bind(groups, sample_rate=0.5, expected_batch_size=2.0)
    assert clips == policy._plan.clip and sum(c**2 for c in clips.values()) == pytest.approx(
        policy.clip**2
    )
