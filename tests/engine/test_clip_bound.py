"""The numerical bound of clipping: no sample's clipped contribution exceeds C (1 + 1e-4), even
for a crafted float32 sample whose tokens nearly cancel (its ghost norm, a difference of large
Gram terms, would come out too small in float32 and scale the sample above the clip)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain.engine import PrivacyEngine
from dptrain.policies import StaticPolicy


def _cancelling_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, r = batch
    return (model(x) * r).sum((1, 2))  # dL/dy_t = r_t


@pytest.mark.parametrize("eps", [1e-2, 1e-4, 1e-6])
@pytest.mark.parametrize("ghost", ["always", "auto", "never"])
def test_crafted_cancelling_sample_stays_within_the_clip(eps, ghost):
    torch.manual_seed(0)
    d, clip, scale = 64, 0.5, 1e4
    model = nn.Linear(d, d, bias=False)  # float32
    a = torch.randn(d)
    g = torch.randn(d)
    a, g = a / a.norm() * scale**0.5, g / g.norm() * scale**0.5
    # two tokens with the same input and output gradients g and -(1 + eps) g: G = -eps g a^T
    x = torch.stack([a, a]).unsqueeze(0)
    r = torch.stack([g, -(1 + eps) * g]).unsqueeze(0)
    before = model.weight.detach().clone()
    engine = PrivacyEngine(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        policy=StaticPolicy(clip=clip, noise_multiplier=0.0),
        sample_rate=1.0,
        dataset_size=1,  # E[B] = 1: the update is the sample's clipped contribution
        loss_fn=_cancelling_loss,
        ghost=ghost,
    )
    engine.step((x, r))
    contribution = (before - model.weight.detach()).double().norm().item()
    rd = r[0].double()
    true = torch.outer(rd[0] + rd[1], a.double()).norm().item()  # ||G|| of the float32 factors
    assert contribution <= clip * (1 + 1e-4)
    # and it is the clipped gradient, not an over-clipped one: min(||G||, C) up to float32
    assert contribution == pytest.approx(min(true, clip), rel=2e-2)
