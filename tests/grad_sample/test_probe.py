"""The sample-independence probe: where a loss coupling is named, the residual check of the
backward pass, and its tolerance for each precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dptrain.grad_sample import GradCapture, UnsupportedLayerError
from dptrain.grad_sample.capture import _grad_tol, _precision, _value_tol


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).sum(1)


def _centered_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    o = model(x)
    return (o - o.mean(0) - y).pow(2).sum(1)


class _CenteredBetween(nn.Module):
    """The batch mean subtracted in the model's own forward, between its two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h - h.mean(0))


class _Centering(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h - h.mean(0)


def _centered_inputs(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x - x.mean(0)) - y).pow(2).sum(1)


def _probe(model: nn.Module, loss, b: int = 3, dtype: torch.dtype = torch.float64) -> None:
    torch.manual_seed(1)
    model = model.to(dtype)
    batch = (torch.randn(b, 4, dtype=dtype), torch.randn(b, 3, dtype=dtype))
    cap = GradCapture(model)
    cap.attach()
    try:
        cap.probe(loss, batch)
    finally:
        cap.detach()


@pytest.mark.parametrize(
    "build,loss,where,fix",
    [
        (lambda: nn.Linear(4, 3), _centered_loss, "the loss function", "each sample's loss"),
        (
            _CenteredBetween,
            _mse,
            r"the forward code of layer '<model>' \(_CenteredBetween\) that computes the input "
            r"of layer 'b' \(Linear\)",
            "LayerNorm",
        ),
        (
            lambda: nn.Sequential(nn.Linear(4, 3)),
            _centered_inputs,
            r"the loss function, before it calls layer '<model>' \(Sequential\)",
            "each sample's loss",
        ),
        (
            lambda: nn.Sequential(nn.Linear(4, 5), _Centering(), nn.Linear(5, 3)),
            _mse,
            r"layer '1' \(_Centering\)",
            "LayerNorm",
        ),
    ],
    ids=["in-the-loss", "between-layers", "before-the-model", "in-a-layer"],
)
def test_loss_coupling_names_where_the_samples_meet(build, loss, where, fix):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedLayerError, match=f"{where}.* mixes the samples.*Fix: .*{fix}"):
        _probe(build(), loss)


class _TailMean(nn.Module):
    """The straight-through mean of rows ``1:`` on those rows: sample 0's gradient untouched."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = h[1:].mean(0)
        return torch.cat([h[:1], h[1:] + (m - m.detach())])


@pytest.mark.parametrize("b", [2, 3, 6])
def test_backward_coupling_that_spares_sample_0_is_refused(b):
    """Every loss value is the sample's own and so is sample 0's gradient; the residual of the
    batch's weighted gradient against its parts' is not rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), _TailMean(), nn.Linear(5, 3))
    with pytest.raises(UnsupportedLayerError, match=r"only gradients differ.*Fix"):
        _probe(model, _mse, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_probe_passes_independent_samples_and_puts_back_their_grad(dtype):
    """No false refusal in any precision, and the parameters' own ``.grad`` survives the
    probe's three backward passes (they accumulate in ``.grad``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    kept = {}
    for i, p in enumerate(model.parameters()):
        if i:  # one parameter without a gradient
            p.grad = torch.full_like(p, 0.25)
            kept[p] = p.grad
    _probe(model, _mse, 5, dtype)
    for i, p in enumerate(model.parameters()):
        if i:
            assert p.grad is kept[p] and bool((p.grad == 0.25).all())
        else:
            assert p.grad is None


def test_gradient_tolerance_follows_the_precision():
    """8 eps in the 16-bit types (bfloat16 8x looser than float16), autocast's type over the
    weights' type, fixed tolerances for float32 and float64."""
    lin = nn.Linear(2, 2)
    bf, fp = [lin.weight.bfloat16()], [lin.weight.half()]
    assert _grad_tol(bf) == 8 * 2.0**-7 == 6.25e-2
    assert _grad_tol(fp) == 8 * 2.0**-10
    assert _grad_tol([lin.weight]) == 1e-4 and _grad_tol([lin.weight.double()]) == 1e-6
    assert _precision([lin.weight, *bf, *fp]) == torch.bfloat16  # the least precise
    with torch.autocast("cpu", dtype=torch.float16):
        assert _precision([lin.weight]) == torch.float16
        assert _grad_tol([lin.weight]) == 8 * 2.0**-10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _grad_tol([lin.weight]) == 6.25e-2


class _LastTwoMean(nn.Module):
    """In a batch of three or more, the straight-through mean of its last two rows on those
    rows (a sample alone is left as it is)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[0] < 3:
            return h
        m = h[-2:].mean(0)
        return torch.cat([h[:-2], h[-2:] + (m - m.detach())])


@pytest.mark.parametrize("b", [4, 5, 8])
def test_backward_coupling_of_the_last_rows_is_refused(b):
    """``batch[1:]`` would keep the last two samples in its last two rows, coupled as in the
    batch (and sample 0 alone is left alone): only reversed does it part them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), _LastTwoMean(), nn.Linear(5, 3))
    with pytest.raises(UnsupportedLayerError, match=r"only gradients differ.*Fix"):
        _probe(model, _mse, b)


def _size_offset(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A coupling in the loss values alone: 0.01 per other sample in the batch (no gradient)."""
    return 0.1 * _mse(model, batch) + 0.01 * (batch[0].shape[0] - 1)


def test_value_tolerance_follows_the_precision():
    """8 eps in the 16-bit types, at most the former flat 3e-2 (bfloat16 keeps it); a float16
    loss moved by 0.01 per sample that joins (up to 2e-2 of 1 + |loss| here) is refused now,
    where the flat 3e-2 (31 float16 eps) passed it."""
    assert _value_tol(torch.float16) == 8 * 2.0**-10
    assert _value_tol(torch.bfloat16) == 3e-2 < 8 * 2.0**-7
    assert _value_tol(torch.float32) == 1e-4 and _value_tol(torch.float64) == 1e-8
    assert _value_tol(torch.int64) == 3e-2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(UnsupportedLayerError, match="loss changes when another sample joins"):
        _probe(model, _size_offset, 3, torch.float16)
    _probe(model, _mse, 3, torch.float16)  # independent samples pass
