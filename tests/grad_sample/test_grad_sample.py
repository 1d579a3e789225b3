"""Every per-sample rule against the explicit per-example loop (hypothesis over shapes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dptrain.clipping import clip_and_sum, per_sample_grads
from dptrain.grad_sample import GradCapture, UnsupportedLayerError
from tests._support import assert_close_rel, loop_per_sample_grads


@pytest.fixture(autouse=True)
def _float64():
    """Exactness checks run in float64; restore the default afterwards for other tests."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, r = batch
    out = model(x)
    dims = tuple(range(1, out.dim()))
    return (out * r).sum(dims) + 0.1 * out.pow(2).sum(dims)


def check_module(module: nn.Module, x: torch.Tensor, seed: int = 0) -> GradCapture:
    module = module.double()
    if torch.is_floating_point(x):
        x = x.double()
    with torch.no_grad():
        out_shape = module(x).shape
    r = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed))
    batch = (x, r)
    cap = GradCapture(module)
    cap.attach()
    recorded, _ = cap.run(_loss, batch)
    got = per_sample_grads(recorded)
    ref = loop_per_sample_grads(module, _loss, batch)
    assert set(got) == set(ref), "a trainable parameter is missing"
    for p, expected in ref.items():
        assert_close_rel(got[p], expected, what=f"per-sample grad {tuple(p.shape)}")
    # ghost norms and book-keeping sums agree with the (already checked) materialized ones
    norms = sum(g.flatten(1).pow(2).sum(1) for g in ref.values()).sqrt()
    clip = 0.5 * float(norms.median()) + 1e-12
    coef = (clip / (norms + 1e-6)).clamp(max=1)
    for mode in ("always", "never"):
        result = clip_and_sum(recorded, dict.fromkeys(ref, "all"), {"all": clip}, ghost=mode)
        assert_close_rel(result.norms["all"], norms, what=f"norms ({mode})")
        for p, g in ref.items():
            want = torch.einsum("b,b...->...", coef, g)
            assert_close_rel(result.sums[p], want, what=f"clipped sum ({mode})")
    cap.detach()
    return cap


shapes = st.tuples(
    st.integers(1, 4),  # batch, including 1
    st.integers(1, 5),  # sequence length
    st.integers(1, 6),  # d_in
    st.integers(1, 6),  # d_out
)


@settings(max_examples=25, deadline=None)
@given(shapes, st.booleans(), st.booleans())
def test_linear(shape, bias, seq):
    b, t, d_in, d_out = shape
    x = torch.randn(b, t, d_in) if seq else torch.randn(b, d_in)
    check_module(nn.Linear(d_in, d_out, bias=bias), x)


def test_linear_extra_axes():
    check_module(nn.Linear(3, 2), torch.randn(2, 3, 4, 3))


@settings(max_examples=20, deadline=None)
@given(shapes, st.sampled_from([None, 0]))
def test_embedding(shape, padding_idx):
    b, t, vocab, d = shape
    vocab += 1
    ids = torch.randint(0, vocab, (b, t))
    check_module(nn.Embedding(vocab, d, padding_idx=padding_idx), ids)


@settings(max_examples=20, deadline=None)
@given(shapes, st.booleans())
def test_layernorm(shape, affine_bias):
    b, t, d, _ = shape
    ln = nn.LayerNorm(d, bias=affine_bias)
    with torch.no_grad():
        ln.weight.normal_()
    check_module(ln, torch.randn(b, t, d))


def test_layernorm_2d_shape():
    check_module(nn.LayerNorm((3, 4)), torch.randn(2, 5, 3, 4))


@settings(max_examples=15, deadline=None)
@given(shapes)
def test_rmsnorm(shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    b, t, d, _ = shape
    for norm in (nn.RMSNorm(d), LlamaRMSNorm(d)):
        with torch.no_grad():
            norm.weight.normal_()
        check_module(norm, torch.randn(b, t, d))


@settings(max_examples=15, deadline=None)
@given(shapes)
def test_hf_conv1d(shape):
    from transformers.pytorch_utils import Conv1D

    b, t, d_in, d_out = shape
    check_module(Conv1D(d_out, d_in), torch.randn(b, t, d_in))


def test_groupnorm():
    check_module(nn.GroupNorm(2, 4), torch.randn(3, 4, 5))


@settings(max_examples=10, deadline=None)
@given(shapes)
def test_lora_linear(shape):
    from peft import LoraConfig, get_peft_model

    b, t, d_in, d_out = shape
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 3))
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["0", "2"], lora_dropout=0.0, init_lora_weights=False)
    )
    check_module(model, torch.randn(b, t, d_in))


class Scaled(nn.Module):
    """A layer no rule knows: elementwise scale and shift with a nonlinearity."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.scale.exp()) + self.shift


def test_fallback_custom_layer():
    model = nn.Sequential(nn.Linear(3, 4), Scaled(4))
    cap = check_module(model, torch.randn(3, 2, 3))
    rules = cap.describe()
    assert rules["1.scale"] == "Scaled re-run per sample"  # through exp: no function rule
    assert rules["1.shift"] == "add"  # a broadcast shift: the elementwise rule
    assert rules["0.weight"] == "linear"


def test_conv2d_rule():
    cap = check_module(nn.Conv2d(2, 3, 3), torch.randn(2, 2, 5, 5))
    assert cap.describe()["weight"] == "conv2d"


def test_layer_called_twice_and_shared_weights():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)  # same parameters used twice
    check_module(model, torch.randn(3, 2, 4))


@pytest.mark.parametrize("frozen", [False, True])
def test_batchnorm_in_train_mode_is_refused_with_fix(frozen):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    model[1].requires_grad_(not frozen)
    cap = GradCapture(model)
    cap.attach()
    batch = (torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(UnsupportedLayerError, match="GroupNorm"):
        cap.run(_loss, batch)


def test_batchnorm_in_eval_mode_is_exact():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].eval()  # frozen statistics: each sample is normalized alone
    check_module(model, torch.randn(4, 3))


def test_frozen_layers_are_not_hooked():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    cap = GradCapture(model)
    assert [n for n, _ in cap.scopes] == ["1"]
