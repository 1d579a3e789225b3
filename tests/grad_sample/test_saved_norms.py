"""Norms' input gradients from the aten backward with the forward's saved statistics, and
transposed convolutions' from ``convolution_backward``: the same bits as autograd through the
function (the inner-graph path, ``generic_input_grads``), for the rule alone and for the
engine's clipped update, in float32, float64 and bfloat16, under CPU autocast and with
checkpointing."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dptrain.check import EngineProbe, engine_update
from dptrain.grad_sample.fused import generic_input_grads
from dptrain.grad_sample.ops import OPS
from dptrain.losses import causal_lm_loss
from tests.engine.builders import CAUSAL_LMS, build_hf, lm_batch

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _autograd_input_grad(func, x, args, g):
    xd = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = func(xd, **args)
    return y.detach(), torch.autograd.grad(y, xd, g)[0]


def _saved_input_grad(func, x, args, g):
    """The rule's saved path on the call ``func(x, **args)`` (weights as trainable)."""
    rule = OPS[func]
    trainable = {id(v) for v in args.values() if isinstance(v, nn.Parameter)}
    call = rule.parse((x,), args, trainable)
    assert call is not None and not rule.closed_input_grad(call)
    out = rule.saved_forward(call, x)
    assert out is not None, "the saved path was not taken"
    y, saved = out
    gx = rule.saved_input_grad(call, saved, g).reshape(x.shape).to(x.dtype)
    return y, gx


def _norm_calls(dtype, wdtype):
    gen = torch.Generator().manual_seed(0)

    def p(*shape):
        return nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64).to(wdtype))

    def x(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    base = x(3, 5, 8)
    return [
        (F.layer_norm, base, {"normalized_shape": (8,), "weight": p(8), "bias": p(8)}),
        (F.layer_norm, base, {"normalized_shape": [5, 8], "weight": p(5, 8), "eps": 1e-3}),
        (F.layer_norm, base.transpose(1, 2), {"normalized_shape": (5,), "bias": p(5)}),
        (F.layer_norm, base[:1].expand(3, 5, 8), {"normalized_shape": (8,), "weight": p(8)}),
        (F.group_norm, x(3, 4, 6), {"num_groups": 2, "weight": p(4), "bias": p(4)}),
        (F.group_norm, x(3, 6, 2, 3), {"num_groups": 3, "weight": p(6)}),
    ]


def _check_call(func, x, args, g) -> None:
    """The saved path gives autograd's output and input gradient (type and bits), or the
    same error where torch's own backward fails (bf16 input, float32 weight and no bias)."""
    try:
        y_ref, gx_ref = _autograd_input_grad(func, x, args, g)
    except RuntimeError as err:
        with pytest.raises(RuntimeError, match=str(err)):
            _saved_input_grad(func, x, args, g)
        return
    y, gx = _saved_input_grad(func, x, args, g)
    assert torch.equal(y, y_ref) and y.dtype == y_ref.dtype, func.__name__
    assert torch.equal(gx, gx_ref) and gx.dtype == gx_ref.dtype, func.__name__


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mixed", [False, True])
def test_saved_input_grads_are_autograds_bits(dtype, mixed):
    """Each call, also transposed and expanded inputs, and bf16 inputs with float32 weights."""
    if mixed and dtype != torch.bfloat16:
        pytest.skip("mixed types: bf16 inputs with float32 weights")
    wdtype = torch.float32 if mixed else dtype
    for func, x, args in _norm_calls(dtype, wdtype):
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        _check_call(func, x, args, g)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same", [False, True])
def test_saved_input_grads_under_cpu_autocast(amp, same):
    """Inputs in the autocast type, weights in it or in float32."""
    with torch.autocast("cpu", dtype=amp):
        for func, x, args in _norm_calls(amp, amp if same else torch.float32):
            g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            _check_call(func, x, args, g.to(amp))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_transposed_conv_input_grad_is_autograds_bits(dims, amp):
    """``convolution_backward`` as autograd calls it: strides, padding, output padding,
    dilation and groups; float32, float64, bfloat16, and float32 under CPU autocast."""
    gen = torch.Generator().manual_seed(dims)
    func = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}
    func = func[dims]
    options = [(1, 0, 0, 1, 1), (2, 1, 1, 1, 1), (2, (1,) * dims, (1,) * dims, 2, 2)]
    for dtype in [torch.float32] if amp else DTYPES:
        for stride, pad, out_pad, dil, groups in options:
            x = torch.randn(2, 4, *[4] * dims, generator=gen).to(dtype)
            w = nn.Parameter(torch.randn(4, 6 // groups, *[3] * dims, generator=gen).to(dtype))
            args = {"weight": w, "stride": stride, "padding": pad, "output_padding": out_pad}
            args.update(groups=groups, dilation=dil)
            amp_ctx = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
            with amp_ctx:
                xd = x.detach().requires_grad_(True)
                y = func(xd, **args)
                g = torch.randn(y.shape, generator=gen).to(y.dtype)
                (ref,) = torch.autograd.grad(y, xd, g)
                gx = _saved_input_grad(func, x, args, g)[1]
            assert torch.equal(gx, ref) and gx.dtype == ref.dtype, (stride, pad, dil, groups)


def _updates_equal(build, batch, loss, *, autocast: bool = False, checkpointing: bool = False):
    def run(generic: bool) -> dict[str, torch.Tensor]:
        model = build()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        ctx = generic_input_grads() if generic else contextlib.nullcontext()
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx, amp:
            return engine_update(model, batch, loss, clip=1e-2).update

    new, old = run(False), run(True)
    assert new.keys() == old.keys() and new
    for name in new:
        assert torch.equal(new[name], old[name]), name


def _hf(arch: str, dtype: torch.dtype):
    cls, over = CAUSAL_LMS[arch]
    return lambda: build_hf(cls, {**over, "num_hidden_layers": 1}).to(dtype)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_update_is_the_generic_paths_bits(arch, dtype):
    _updates_equal(_hf(arch, dtype), lm_batch(2, 0), causal_lm_loss)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_engine_update_under_cpu_autocast_is_the_generic_paths_bits(arch):
    _updates_equal(_hf(arch, torch.float32), lm_batch(2, 0), causal_lm_loss, autocast=True)


def test_engine_update_with_checkpointing_is_the_generic_paths_bits():
    _updates_equal(_hf("gpt2", torch.float32), lm_batch(2, 0), causal_lm_loss, checkpointing=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_net_update_is_the_generic_paths_bits(dtype):
    """GroupNorm (saved statistics) and a transposed convolution (its input gradient)."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv1d(2, 4, 3),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
            nn.ConvTranspose1d(4, 2, 3, stride=2),
            nn.Flatten(),
            nn.Linear(18, 3),
        )
        return net.to(dtype)

    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(3, 2, 6, generator=gen).to(dtype), torch.randn(3, 3, generator=gen))

    def loss(model, b):
        return (model(b[0]).float() - b[1]).square().sum(1)

    _updates_equal(build, batch, loss)


class _DirectUpstream(nn.Module):
    """A layer norm, a transposed convolution and a group norm downstream of a parameter the
    loss uses outside every module (differentiated directly: one vectorized backward over the
    per-sample losses, ``is_grads_batched``, runs through their fused nodes)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(6, 6) * 0.5)
        self.ln = nn.LayerNorm(6)
        self.conv_t = nn.ConvTranspose1d(2, 2, 3, stride=2)
        self.gn = nn.GroupNorm(1, 2)
        self.head = nn.Linear(26, 2)

    def forward(self, x):
        return self.head(self.gn(self.conv_t(self.ln(x))).flatten(1))


def _direct_loss(model, batch):
    return (model(torch.matmul(batch[0], model.p)) - batch[1]).square().sum(1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_direct_backward_through_saved_nodes_is_the_generic_paths_bits(dtype):
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(3, 2, 6, generator=gen).to(dtype), torch.randn(3, 2, generator=gen))

    def build() -> nn.Module:
        torch.manual_seed(0)
        return _DirectUpstream().to(dtype)

    def loss(model, b):
        return _direct_loss(model, b).float()

    _updates_equal(build, (batch[0], batch[1].to(dtype)), loss)
    model = build()
    probe = EngineProbe(model, loss, 1e-2, "flat", 3.0)
    try:
        probe.step((batch[0], batch[1].to(dtype)))
        plan = probe.engine.capture.plan
        assert plan.direct and plan.direct_batched  # the vectorized backward was taken
    finally:
        probe.close()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_saved_input_grads_on_cuda(amp):
    """The rules alone on the GPU, where autocast casts norms to float32 (the saved path
    follows the casts it probes): autograd's output and input gradient, type and bits."""
    dtype = amp or torch.float32
    ctx = torch.autocast("cuda", dtype=amp) if amp else contextlib.nullcontext()
    with ctx:
        for func, x, args in _norm_calls(dtype, torch.float32):
            x = x.cuda()
            args = {
                k: nn.Parameter(v.detach().cuda()) if isinstance(v, nn.Parameter) else v
                for k, v in args.items()
            }
            g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).cuda()
            _check_call(func, x, args, g.to(dtype))


@CUDA
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_engine_update_on_cuda_is_the_generic_paths_bits(arch, amp):
    """The engine's clipped update on the GPU (fp32, and under bf16 / fp16 autocast)."""

    def run(generic: bool) -> dict[str, torch.Tensor]:
        model = _hf(arch, torch.float32)().cuda()
        batch = {k: v.cuda() for k, v in lm_batch(2, 0).items()}
        ctx = generic_input_grads() if generic else contextlib.nullcontext()
        cast = torch.autocast("cuda", dtype=amp) if amp else contextlib.nullcontext()
        with ctx, cast:
            return engine_update(model, batch, causal_lm_loss, clip=1e-2).update

    new, old = run(False), run(True)
    assert new.keys() == old.keys() and new
    for name in new:
        assert torch.equal(new[name], old[name]), name


def test_group_norm_output_gradient_in_any_layout_is_autograds_bits():
    """The kernel reads ``dY`` as raw row-major memory: an expanded ``dY`` (the gradient of a
    sum) was read out of its bounds, a transposed or channels-last one in the wrong order."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, 4, generator=gen)
    args = {"num_groups": 2, "weight": nn.Parameter(torch.randn(6, generator=gen))}
    for g in [
        torch.randn(1, 6, 5, 4, generator=gen).expand(3, 6, 5, 4),
        torch.randn(3, 6, 4, 5, generator=gen).transpose(2, 3),
        torch.randn(3, 6, 5, 4, generator=gen).to(memory_format=torch.channels_last),
    ]:
        _check_call(F.group_norm, x, args, g)


def test_group_norm_input_not_row_major_keeps_the_generic_path():
    """``group_norm`` makes such an input contiguous in a per-device memory format (and
    ``native_group_norm`` refuses it or reads it raw): the inner graph differentiates it."""
    gen = torch.Generator().manual_seed(0)
    rule = OPS[F.group_norm]
    w = nn.Parameter(torch.randn(6, generator=gen))
    for x in [
        torch.randn(3, 6, 5, 4, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(3, 4, 6, generator=gen).transpose(1, 2),
        torch.randn(1, 6, 5, generator=gen).expand(3, 6, 5),
        torch.randn(3, 6, 10, generator=gen)[:, :, ::2],
    ]:
        call = rule.parse((x,), {"num_groups": 3, "weight": w}, {id(w)})
        assert call is not None and rule.saved_forward(call, x) is None


class _ChannelsLastGroupNorm(nn.Module):
    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.channels_last = channels_last

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.gn(self.conv(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_summed_or_channels_last_update_is_the_generic_paths_bits(channels_last):
    """Each sample's loss sums a second call's output (whose ``dY`` is expanded), in a
    row-major and a channels-last model."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return _ChannelsLastGroupNorm(channels_last)

    def loss(model, b):
        return model(b).square().sum((1, 2, 3)) + model(b).sum((1, 2, 3))

    batch = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    _updates_equal(build, batch, loss)
