"""Every per-sample rule against the explicit per-example loop (hypothesis over shapes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dptrain.clipping import clip_and_sum
from dptrain.grad_sample import GradCapture, UnsupportedLayerError
from tests._support import assert_close_rel, loop_per_sample_grads, per_sample_grads


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


class _BatchMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.amax(0, keepdim=True)


def test_batch_max_held_by_a_middle_sample_is_refused():
    """Duplicating sample 0 or removing it (or the last one) leaves a maximum that sample 1
    holds unchanged; only its first sample alone sees it change."""
    model = nn.Sequential(_BatchMax(), nn.Linear(2, 2))
    x = torch.tensor([[0.0, 1.0], [5.0, 6.0], [1.0, 0.0]])  # sample 1 is every feature's max
    cap = GradCapture(model)
    cap.attach()
    with pytest.raises(UnsupportedLayerError, match=r"layer '0' \(_BatchMax\).*Fix"):
        cap.run(_loss, (x, torch.randn(3, 2)))


class _Square(torch.autograd.Function):
    """``x^2`` whose backward leaves torch (numpy): no batching rule, so the vectorized
    Jacobian of :meth:`GradCapture._direct_grads` fails and it falls back to a loop."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        _Square.calls += 1
        (x,) = ctx.saved_tensors
        return 2 * x * torch.from_numpy(g.detach().numpy().copy())


def _square_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, r = batch
    out = _Square.apply(model(x) * model.temp)  # ``temp`` is used outside every layer: direct
    return (out * r).sum(1)


def test_direct_path_without_batching_rule_is_remembered_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model.temp = nn.Parameter(torch.randn(2))
    model.temp2 = nn.Parameter(torch.randn(2))

    def loss(m, batch):
        return _square_loss(m, batch) + (m.temp2 * batch[1]).sum(1) * 0.5

    cap = GradCapture(model)
    cap.attach()
    b = 3
    batch = (torch.randn(b, 3), torch.randn(b, 2))
    for step in range(2):
        _Square.calls = 0
        recorded, _ = cap.run(loss, batch)
        # step 1: the probe's three backward passes (the batch, batch[1:] and batch[:1]: the
        # residual check), the failed vectorized attempt, B single backward passes, the batch's
        # backward; step 2: the plan remembers the failure
        assert _Square.calls == (b + 5 if step == 0 else b + 1)
        got = per_sample_grads(recorded)
        ref = loop_per_sample_grads(model, loss, batch)
        assert set(got) == set(ref)
        for p, expected in ref.items():
            assert_close_rel(got[p], expected, what=f"step {step + 1} {tuple(p.shape)}")
    names = [cap.param_names[i] for i in cap.plan.direct_order]
    assert names == ["temp", "temp2"]  # model order, computed once in the plan
    assert not cap.plan.direct_batched
    notes = cap.summary()["notes"]
    assert any("no batching rule" in n for n in notes)
    # run.json is public: the error's text (it may quote the Poisson batch's shapes) is private
    (private,) = cap.private_notes()
    error = private.split(": ", 1)[1]
    assert error and not any(error in n for n in notes)
    assert not any(str(b) in n.replace("temp2", "") for n in notes)  # no batch size either
    cap.detach()


def test_mode_change_after_planning_is_probed_again():
    """A BatchNorm put back in train mode after the first step is refused, before its running
    statistics see the batch; dropout switched on makes its module leave the re-run path."""
    from dptrain.check import EngineProbe
    from dptrain.losses import mse_loss

    class DropScaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.randn(4))
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(torch.tanh(x * self.scale.exp()))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), DropScaled(), nn.Linear(4, 2))
    model.eval()
    probe = EngineProbe(model, mse_loss, 0.1, expected_batch_size=3.0)
    batch = (torch.randn(3, 3), torch.randn(3, 2))
    try:
        probe.step(batch)
        assert probe.engine.capture.describe()["2.scale"] == "DropScaled re-run per sample"
        model[2].train()  # dropout on: a re-run per sample would redraw the mask
        probe.step(batch)
        assert "autograd" in probe.engine.capture.describe()["2.scale"]
        model[1].train()
        stats = {n: b.clone() for n, b in model[1].named_buffers()}
        with pytest.raises(UnsupportedLayerError, match=r"layer '1' \(BatchNorm1d\).*Fix"):
            probe.step(batch)
        assert all(torch.equal(b, stats[n]) for n, b in model[1].named_buffers())
    finally:
        probe.close()


class _SelfScaling(nn.Module):
    """Rescales its own weight from the data in the forward pass (too little to move the
    losses the probes compare), through ``no_grad`` or through ``.data``."""

    def __init__(self, via_data: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.via_data = via_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 1 + 1e-12 * x.abs().mean()
        if self.via_data:
            self.lin.weight.data.mul_(factor)
        else:
            with torch.no_grad():
                self.lin.weight.mul_(factor)
        return self.lin(x)


@pytest.mark.parametrize("via_data", [False, True])
def test_forward_that_writes_its_parameters_is_refused(via_data):
    cap = GradCapture(_SelfScaling(via_data))
    cap.attach()
    with pytest.raises(UnsupportedLayerError, match=r"lin\.weight in place.*Fix"):
        cap.run(_loss, (torch.randn(3, 3), torch.randn(3, 2)))


@pytest.mark.parametrize(
    "via_data, refusal",
    [
        (False, r"lin\.weight in place"),  # seen by the version counter
        (True, r"lin\.weight in place through \.data, in '<model>' \(_Self"),  # by the watch
    ],
)
def test_parameter_written_after_planning_is_refused(via_data, refusal):
    """A forward pass that starts writing its weight after the plan was made (no probe sees
    it) is refused at that step: by the version counter, or, for a write through ``.data``
    (which leaves the counter alone), by the step's ``.data`` watch, which fingerprints the
    parameter before the write and names the module."""
    model = _SelfScaling(via_data=via_data)
    armed = [False]
    inner = model.forward
    model.forward = lambda x: inner(x) if armed[0] else model.lin(x)
    cap = GradCapture(model)
    cap.attach()
    batch = (torch.randn(3, 3), torch.randn(3, 2))
    cap.run(_loss, batch)
    cap.run(_loss, batch)  # planned steps that write nothing pass
    armed[0] = True
    with pytest.raises(UnsupportedLayerError, match=refusal):
        cap.run(_loss, batch)
    assert "data" not in nn.Parameter.__dict__  # the watch is gone after the step


class _RunningMean(nn.Module):
    """Starts folding the batch mean into a buffer once armed (after planning), with a
    version bump (``add_``) or without one (through ``.data``)."""

    def __init__(self, via_data: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("mean", torch.zeros(3))
        self.via_data, self.armed = via_data, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            target = self.mean.data if self.via_data else self.mean
            with torch.no_grad():
                target.mul_(0.9).add_(0.1 * x.mean(0))
        return self.lin(x)


@pytest.mark.parametrize("via_data", [False, True])
def test_buffer_updated_after_planning_is_refused_and_restored(via_data):
    model = _RunningMean(via_data)
    cap = GradCapture(model)
    cap.attach()
    batch = (torch.randn(3, 3), torch.randn(3, 2))
    cap.run(_loss, batch)
    model.mean.fill_(0.5)  # a public value set between steps is what must come back
    before = model.mean.clone()
    model.armed = True
    with pytest.raises(UnsupportedLayerError, match=r"buffers mean were updated.*restored.*Fix"):
        cap.run(_loss, batch)
    assert torch.equal(model.mean, before)


class _KeepsState(nn.Module):
    """Keeps its last output on itself, as RecurrentGemma keeps its last recurrent state."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.fixed = torch.zeros(2)  # a plain tensor attribute set before any step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        self.state = out.detach()  # (B, 2): computed from the private batch
        self.fixed = out.detach()[0]
        return out


def test_tensor_attributes_a_step_sets_are_cleared():
    torch.manual_seed(0)
    model = _KeepsState()
    fixed = model.fixed
    cap = GradCapture(model)
    cap.attach()

    def loss(m, batch):
        return (m(batch[0]) * batch[1]).sum(1)

    batch = (torch.randn(3, 3), torch.randn(3, 2))
    for _ in range(2):  # the planning step (probes) and a planned one
        recorded, _ = cap.run(loss, batch)
        assert not hasattr(model, "state") and model.fixed is fixed
        got, ref = per_sample_grads(recorded), loop_per_sample_grads(model, loss, batch)
        for p, expected in ref.items():
            assert_close_rel(got[p], expected, what=str(tuple(p.shape)))
        del model.state
        model.fixed = fixed
    cap.detach()
