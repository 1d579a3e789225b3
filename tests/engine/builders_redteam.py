"""Red-team cases, round 3 (branch redteam): layer options, functional uses of parameters,
losses that read parameters, HF heads and architectures, and peft kinds that no other module
of the matrix covers.  Each case is judged with the clip binding (the matrix's default) and
with a clip so large that clipping is the identity (``test_exact_redteam.py``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from torch.overrides import TorchFunctionMode

from dptrain.batching import batch_len, batch_slice
from dptrain.check import Reference, clipped_update, group_clips
from dptrain.losses import causal_lm_loss, mse_loss

from . import builders as B
from .builders import Case, _seeded, conv_net, regression, seq_ce_loss, seq_tokens

# -- torch.nn layers and options -----------------------------------------------------------


class Bag(nn.Module):
    """``EmbeddingBag`` on (B, L) ids, or on the flattened ids with ``offsets`` built from the
    batch (the batch axis exists only through the offsets), optionally weighted per id."""

    def __init__(self, mode: str, flat: bool = False, weighted: bool = False, **kw: Any) -> None:
        super().__init__()
        self.flat, self.weighted = flat, weighted
        self.bag = nn.EmbeddingBag(11, 6, mode=mode, **kw)
        self.tok_w = nn.Parameter(torch.rand(11)) if weighted else None
        self.head = nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        psw = self.tok_w[ids] if self.tok_w is not None else None
        if self.flat:
            b, n = ids.shape
            offsets = torch.arange(0, b * n, n)
            out = self.bag(
                ids.flatten(), offsets, per_sample_weights=psw.flatten() if self.weighted else None
            )
        else:
            out = self.bag(ids, per_sample_weights=psw)
        return self.head(torch.tanh(out))


class FlatIds(nn.Module):
    """An embedding of the flattened (B*T,) ids (the sample-major rows path), a position table
    tiled to (B*T, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 6), nn.Linear(6, 11)
        self.pos = nn.Parameter(torch.randn(5, 6))

    def forward(self, ids: Tensor) -> Tensor:
        b, t = ids.shape
        h = self.emb(ids.reshape(-1)) + self.pos.repeat(b, 1)
        return self.head(torch.tanh(h)).view(b, t, -1)


class FunctionalMaxNorm(nn.Module):
    """``F.embedding(ids, w, max_norm=1)`` in forward code: renormalizes rows of ``w`` in
    place (no ``nn.Embedding`` module to recognize)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(11, 6))
        self.head = nn.Linear(6, 11)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(F.embedding(ids, self.w, max_norm=1.0)))


class LearnedInitRNN(nn.Module):
    """A recurrent layer whose initial state is a parameter expanded over the batch."""

    def __init__(self, kind: str, batch_first: bool, **kw: Any) -> None:
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.rnn = getattr(nn, kind)(4, 5, batch_first=batch_first, **kw)
        self.h0 = nn.Parameter(torch.randn(1, 1, 5))
        self.c0 = nn.Parameter(torch.randn(1, 1, 5)) if kind == "LSTM" else None
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        h0 = self.h0.expand(1, b, 5).contiguous()
        state: Any = (h0, self.c0.expand(1, b, 5).contiguous()) if self.c0 is not None else h0
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1), state)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out[:, -1])


class StateFromInput(nn.Module):
    """A GRU whose initial state is computed from the sample (``hx = tanh(lin(x[:, 0]))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Linear(4, 5)
        self.rnn = nn.GRU(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        hx = torch.tanh(self.init(x[:, 0])).unsqueeze(0)
        out, _ = self.rnn(x, hx)
        return self.head(out[:, -1])


class FunctionalNorms(nn.Module):
    """``F.rms_norm``, ``F.layer_norm``, ``F.group_norm`` with parameters of the module."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.rms_w = nn.Parameter(torch.randn(6))
        self.ln_w, self.ln_b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.gn_w, self.gn_b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        h = F.rms_norm(h, (6,), self.rms_w, eps=1e-6)
        h = F.layer_norm(torch.tanh(h), (6,), self.ln_w, self.ln_b)
        h = F.group_norm(torch.tanh(h).unsqueeze(-1), 2, self.gn_w, self.gn_b).squeeze(-1)
        return self.head(h)


class RMSNorm2D(nn.Module):
    """``nn.RMSNorm`` over the last two axes, inside a checkpointed block."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.pre, self.lin = nn.Linear(4, 4), nn.Linear(4, 6)
        self.norm = nn.RMSNorm((5, 6))
        self.head = nn.Linear(6, 3)

    def block(self, x: Tensor) -> Tensor:
        return self.norm(torch.tanh(self.lin(x)))

    def forward(self, x: Tensor) -> Tensor:
        # reentrant checkpointing passes gradients only to inputs that require them
        h = self.pre(x)
        h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h.mean(1))


class ParamIndexing(nn.Module):
    """A parameter table read by advanced indexing and ``index_select`` with token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(11, 6))
        self.bias = nn.Parameter(torch.randn(11, 6))
        self.head = nn.Linear(6, 11)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.table[ids] + torch.index_select(self.bias, 0, ids.flatten()).view(*ids.shape, 6)
        return self.head(torch.tanh(h))


class EinsumParams(nn.Module):
    """Parameters used through ``einsum``, ``addmm`` and ``baddbmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.w2 = nn.Parameter(torch.randn(6, 6))
        self.b2 = nn.Parameter(torch.randn(6))
        self.w3 = nn.Parameter(torch.randn(6, 3))
        self.b3 = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(torch.einsum("bti,oi->bto", x, self.w1))
        b, t, d = h.shape
        h = torch.tanh(torch.addmm(self.b2, h.reshape(b * t, d), self.w2)).view(b, t, d)
        w3 = self.w3.expand(b, 6, 3)
        return torch.baddbmm(self.b3, h, w3).mean(1)


class LossReadsParams(nn.Module):
    """A model whose loss reads a parameter outside the forward (a learned temperature)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.log_temp = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def temperature_ce(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    logits = model(x) / model.log_temp.exp()
    return F.cross_entropy(logits, y.argmax(1), reduction="none")


def l2_regularized_mse(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Each sample's loss plus an L2 penalty on the weights (the same for every sample)."""
    x, y = batch
    reg = sum((p**2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
    return ((model(x) - y) ** 2).mean(1) + 1e-2 * reg


class STEQuant(torch.autograd.Function):
    """Rounding with a straight-through backward."""

    @staticmethod
    def forward(w: Tensor) -> Tensor:
        return torch.round(w * 4) / 4

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g


class QuantizedLinear(nn.Module):
    """Weights quantized by a straight-through ``autograd.Function`` before ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(F.linear(x, STEQuant.apply(self.w), self.b)))


class QuantizedAndPlain(nn.Module):
    """One weight used through ``F.linear`` (a fused rule) and through the straight-through
    ``autograd.Function`` (invisible to the probe), and a re-run module's weight likewise."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.cell = nn.GRUCell(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(F.linear(x, self.w) + F.linear(x, STEQuant.apply(self.w)))
        h = self.cell(h) + F.linear(h, STEQuant.apply(self.cell.weight_hh))[:, :6]
        return self.head(h)


class WeightStandardizedConv(nn.Module):
    """A convolution whose weight is standardized in forward code (WS-conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.b = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        w = self.w - self.w.mean((1, 2, 3), keepdim=True)
        w = w / (w.pow(2).mean((1, 2, 3), keepdim=True) + 1e-5).sqrt()
        return self.head(torch.tanh(F.conv2d(x, w, self.b, padding=1)).flatten(1))


class InplaceParamAdd(nn.Module):
    """Parameters added in place to activations (``h += b``, ``h.mul_(g)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6, bias=False)
        self.b = nn.Parameter(torch.randn(6))
        self.g = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        h += self.b
        h.mul_(self.g)
        return self.head(torch.tanh(h))


class RepeatedParam(nn.Module):
    """A parameter tiled over the batch with ``repeat`` (a copy, not a view) and concatenated
    to the input, and a scalar decay used in a Python recurrence over time."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = nn.Parameter(torch.randn(1, 2, 4))
        self.decay = nn.Parameter(torch.tensor(0.6))
        self.lin = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.prefix.repeat(x.shape[0], 1, 1), x], 1)
        h = torch.tanh(self.lin(h))
        s = torch.zeros_like(h[:, 0])
        for t in range(h.shape[1]):
            s = torch.sigmoid(self.decay) * s + h[:, t]
        return self.head(s)


class WhereFill(nn.Module):
    """A learned vector replacing masked positions (``torch.where``; wav2vec2's mask embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.fill = nn.Parameter(torch.randn(4))
        self.lin = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x[..., :1] > 0.3).expand_as(x)
        h = torch.where(mask, self.fill.expand_as(x), x)
        return self.head(torch.tanh(self.lin(h)).mean(1))


class AdaptiveSoftmax(nn.Module):
    """``nn.AdaptiveLogSoftmaxWithLoss``: rows gathered per target cluster (data dependent)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(8, 12, cutoffs=[3, 7], div_value=2.0)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.asm(torch.tanh(self.lin(x)), y).output


def adaptive_batch(b: int, seed: int) -> tuple[Tensor, Tensor]:
    g = B._gen(seed)
    x = torch.randn(b, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 12, (b,), generator=g)


def adaptive_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return -model(x, y)


class SpectralTrain(nn.Module):
    """``parametrizations.spectral_norm`` in train mode: each forward updates the power
    iteration's buffers ``_u``/``_v`` in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = parametrizations.spectral_norm(nn.Linear(4, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(x)))


class VmapOverTime(nn.Module):
    """The model's own ``torch.vmap`` over time steps (the batch on axis 0 of each step):
    parameters used on functorch wrappers."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.g = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def step(self, xt: Tensor) -> Tensor:
        return torch.tanh(F.linear(xt, self.w)) * self.g + torch.atan2(xt[:, :1], self.g)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.vmap(self.step)(x.transpose(0, 1)).mean(0))


class SharedRowZero(nn.Module):
    """A Linear on a constant (1, 4) buffer (shared by the batch), its output read as
    ``out[0]`` and added to every sample: broadcast to (B, 6), only row 0 was read, so every
    sample's gradient of ``lin`` went to sample 0."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("const", torch.randn(1, 4))
        self.lin, self.inp, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inp(x) + self.lin(self.const)[0]))


class LearnedQueryPool(nn.Module):
    """Attention pooling with a learned (1, 1, d) query through a Linear (a shared use whose
    rows do stay per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(1, 1, 6))
        self.lin, self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        k = self.lin(x)
        a = torch.softmax(self.proj(self.q) @ k.transpose(1, 2), -1)
        return self.head((a @ k).squeeze(1))


class ChunkedAndLooped(nn.Module):
    """The batch split in chunks of 2 for one layer, one sample at a time for the next."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(torch.cat([self.lin(c) for c in x.split(2)]))
        return torch.cat([self.head(h[i : i + 1]) for i in range(h.shape[0])])


class TimeMajorRows(nn.Module):
    """(B, 2, d) flattened time-major, (2B, d) rows ``t * B + b``, for a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        h = self.lin(x.transpose(0, 1).reshape(-1, 4)).view(2, b, 6).transpose(0, 1)
        return self.head(torch.tanh(h.reshape(b, 12)))


class BatchSizeBranch(nn.Module):
    """``if x.shape[0] > 1``: a sample alone takes another branch than in a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return self.head(torch.tanh(h * 2.0 if x.shape[0] > 1 else h))


def _net(*body: nn.Module) -> Any:
    return lambda: nn.Sequential(*body)


REDTEAM_CASES: dict[str, Case] = {
    "embeddingbag-max": Case(_seeded(lambda: Bag("max")), B.ids_regression(5, 3), mse_loss),
    "embeddingbag-sum-per-sample-weights": Case(
        _seeded(lambda: Bag("sum", weighted=True)), B.ids_regression(5, 3), mse_loss
    ),
    "embeddingbag-flat-offsets-mean": Case(
        _seeded(lambda: Bag("mean", flat=True)), B.ids_regression(5, 3), mse_loss
    ),
    "embeddingbag-flat-offsets-weighted": Case(
        _seeded(lambda: Bag("sum", flat=True, weighted=True)), B.ids_regression(5, 3), mse_loss
    ),
    "embeddingbag-mean-padding-idx": Case(
        _seeded(lambda: Bag("mean", padding_idx=0)), B.ids_regression(5, 3, vocab=4), mse_loss
    ),
    "embedding-flat-ids": Case(_seeded(FlatIds), seq_tokens(5), seq_ce_loss),
    "refuse-functional-embedding-max-norm": Case(
        _seeded(FunctionalMaxNorm), seq_tokens(5), seq_ce_loss, refuse=""
    ),  # refuse="": the model itself, named by its class
    "conv2d-circular-grouped-strided-dilated": Case(
        _seeded(
            lambda: conv_net(
                [
                    nn.Conv2d(
                        2, 4, 3, stride=2, dilation=2, padding=2, groups=2, padding_mode="circular"
                    ),
                    nn.Tanh(),
                ],
                4 * 3 * 3,
            )
        ),
        regression((2, 6, 6), 3),
        mse_loss,
    ),
    "conv1d-replicate-no-bias": Case(
        _seeded(
            lambda: conv_net(
                [nn.Conv1d(2, 3, 3, padding=1, padding_mode="replicate", bias=False), nn.Tanh()],
                3 * 6,
            )
        ),
        regression((2, 6), 3),
        mse_loss,
    ),
    "convtranspose2d-grouped-dilated-no-bias": Case(
        _seeded(
            lambda: conv_net(
                [
                    nn.ConvTranspose2d(2, 4, 2, stride=2, dilation=2, groups=2, bias=False),
                    nn.Tanh(),
                ],
                4 * 7 * 7,
            )
        ),
        regression((2, 3, 3), 3),
        mse_loss,
    ),
    "prelu-conv2d-channels": Case(
        _seeded(lambda: conv_net([nn.Conv2d(2, 3, 3), nn.PReLU(3)], 3 * 2 * 2)),
        regression((2, 4, 4), 3),
        mse_loss,
    ),
    "instancenorm2d-affine-groupnorm-1-group": Case(
        _seeded(
            lambda: conv_net(
                [nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.GroupNorm(1, 4)],
                4 * 2 * 2,
            )
        ),
        regression((2, 4, 4), 3),
        mse_loss,
    ),
    "layernorm-no-bias": Case(
        _seeded(_net(nn.Linear(4, 6), nn.LayerNorm(6, bias=False), nn.Tanh(), nn.Linear(6, 3))),
        regression((4,), 3),
        mse_loss,
    ),
    "rnn-relu-no-bias-learned-h0": Case(
        _seeded(lambda: LearnedInitRNN("RNN", True, nonlinearity="relu", bias=False)),
        regression((5, 4), 3),
        mse_loss,
    ),
    "lstm-seq-first-learned-h0-c0": Case(
        _seeded(lambda: LearnedInitRNN("LSTM", False)), regression((5, 4), 3), mse_loss
    ),
    "gru-batch-first-learned-h0": Case(
        _seeded(lambda: LearnedInitRNN("GRU", True)), regression((5, 4), 3), mse_loss
    ),
    "gru-state-from-input": Case(_seeded(StateFromInput), regression((5, 4), 3), mse_loss),
    "functional-rms-layer-group-norm": Case(
        _seeded(FunctionalNorms), regression((4,), 3), mse_loss
    ),
    "rmsnorm-2d-checkpoint-reentrant": Case(
        _seeded(lambda: RMSNorm2D(True)), regression((5, 4), 3), mse_loss
    ),
    "rmsnorm-2d-checkpoint-non-reentrant": Case(
        _seeded(lambda: RMSNorm2D(False)), regression((5, 4), 3), mse_loss
    ),
    "param-indexing-index-select": Case(_seeded(ParamIndexing), seq_tokens(5), seq_ce_loss),
    "einsum-addmm-baddbmm": Case(_seeded(EinsumParams), regression((5, 4), 3), mse_loss),
    "loss-reads-temperature": Case(_seeded(LossReadsParams), regression((4,), 3), temperature_ce),
    "loss-l2-regularizer": Case(
        _seeded(lambda: LossReadsParams().body), regression((4,), 3), l2_regularized_mse
    ),
    "autograd-function-ste-weight": Case(_seeded(QuantizedLinear), regression((4,), 3), mse_loss),
    "autograd-function-ste-weight-and-fused": Case(
        _seeded(QuantizedAndPlain), regression((4,), 3), mse_loss
    ),
    "weight-standardized-conv": Case(
        _seeded(WeightStandardizedConv), regression((2, 4, 4), 3), mse_loss
    ),
    "inplace-param-add-mul": Case(_seeded(InplaceParamAdd), regression((4,), 3), mse_loss),
    "param-repeat-and-scalar-recurrence": Case(
        _seeded(RepeatedParam), regression((4, 4), 3), mse_loss
    ),
    "param-where-fill": Case(_seeded(WhereFill), regression((5, 4), 3), mse_loss),
    "adaptive-log-softmax": Case(_seeded(AdaptiveSoftmax), adaptive_batch, adaptive_loss),
    "vmap-over-time": Case(_seeded(VmapOverTime), regression((5, 4), 3), mse_loss),
    "shared-linear-row-zero": Case(_seeded(SharedRowZero), regression((4,), 3), mse_loss),
    "learned-query-pool": Case(_seeded(LearnedQueryPool), regression((5, 4), 3), mse_loss),
    "batch-chunked-and-looped": Case(_seeded(ChunkedAndLooped), regression((4,), 3), mse_loss),
    "rows-time-major": Case(_seeded(TimeMajorRows), regression((2, 4), 3), mse_loss),
    "refuse-batch-size-branch": Case(
        _seeded(BatchSizeBranch), regression((4,), 3), mse_loss, refuse=""
    ),
    "refuse-spectral-norm-train": Case(
        _seeded(SpectralTrain),
        regression((4,), 3),
        mse_loss,
        refuse="lin.parametrizations.weight.0",
    ),  # named as the buffers' owner
}


# -- transformers --------------------------------------------------------------------------


def moe_aux_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Each sample's NLL plus the router's load-balancing loss of the whole batch (what HF adds
    to ``.loss`` with ``output_router_logits``): couples the samples."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_router_logits=True,
    )
    from dptrain.losses import token_nll

    return token_nll(out.logits, batch["labels"]).mean_per_sample + 0.02 * out.aux_loss


def multiple_choice_batch(b: int, seed: int) -> dict[str, Tensor]:
    base = B.lm_batch(b * 2, seed, 5)
    return {
        "input_ids": base["input_ids"].view(b, 2, 5),
        "attention_mask": base["attention_mask"].view(b, 2, 5),
        "labels": torch.randint(0, 2, (b,), generator=B._gen(seed + 1)),
    }


def unpadded_lm_batch(b: int, seed: int) -> dict[str, Tensor]:
    """No padding: with a window shorter than the padding, eager attention leaves the padded
    rows fully masked, and transformers' own output there is NaN (not an engine case)."""
    g = B._gen(seed)
    ids = torch.randint(3, B.VOCAB, (b, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def last_token_cls_batch(b: int, seed: int) -> dict[str, Tensor]:
    """Right-padded classification batch (pad id 0): the head pools the last non-pad token."""
    return B.cls_batch(b, seed)


_BART_LIKE = {
    "head_dim": None,
    "num_key_value_heads": None,
    "d_model": 16,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
    "forced_eos_token_id": None,
}


def eos_cls_batch(b: int, seed: int) -> dict[str, Tensor]:
    """One eos (id 2) per row, at its last real token: BART and T5 classification heads pool
    the hidden state of each row's last eos (boolean-mask indexing over the whole batch)."""
    batch = B.cls_batch(b, seed)
    last = batch["attention_mask"].sum(1) - 1
    batch["input_ids"][torch.arange(b), last] = 2
    return batch


def token_cls_batch(b: int, seed: int) -> dict[str, Tensor]:
    batch = B.lm_batch(b, seed)
    labels = torch.randint(0, 3, batch["input_ids"].shape, generator=B._gen(seed + 1))
    batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def token_cls_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    nll = F.cross_entropy(
        out.logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none"
    )
    mask = (batch["labels"] != -100).to(nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


HF_NEW: dict[str, tuple[str, dict[str, Any], Any, Any]] = {
    "llama-seq-cls-last-token": (
        "LlamaForSequenceClassification",
        {"num_labels": 3},
        last_token_cls_batch,
        B.classification_loss,
    ),
    "gpt2-seq-cls-last-token": (
        "GPT2ForSequenceClassification",
        {"head_dim": None, "num_key_value_heads": None, "num_labels": 3},
        last_token_cls_batch,
        B.classification_loss,
    ),
    "bert-multiple-choice": (
        "BertForMultipleChoice",
        {"head_dim": None, "num_key_value_heads": None},
        multiple_choice_batch,
        B.classification_loss,
    ),
    "qwen2-sliding-window": (
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 2, "max_window_layers": 1},
        unpadded_lm_batch,
        causal_lm_loss,
    ),
    "mistral-window-2": (
        "MistralForCausalLM",
        {"sliding_window": 2},
        unpadded_lm_batch,
        causal_lm_loss,
    ),
    "gpt-neo-local": (
        "GPTNeoForCausalLM",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "num_layers": 2,
            "attention_types": [[["global", "local"], 1]],
            "window_size": 2,
            "num_heads": 2,
        },
        B.lm_batch,
        causal_lm_loss,
    ),
    "pegasus": (
        "PegasusForConditionalGeneration",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "d_model": 16,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "decoder_ffn_dim": 32,
            "decoder_start_token_id": 0,
            "forced_eos_token_id": None,
        },
        B.seq2seq_batch,
        B.seq2seq_loss,
    ),
    "bart-seq-cls-eos-pool": (
        "BartForSequenceClassification",
        {**_BART_LIKE, "num_labels": 3, "decoder_start_token_id": 2},
        eos_cls_batch,
        B.classification_loss,
    ),
    "t5-seq-cls-eos-pool": (
        "T5ForSequenceClassification",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "d_model": 16,
            "d_kv": 8,
            "d_ff": 32,
            "num_layers": 1,
            "num_heads": 2,
            "relative_attention_num_buckets": 8,
            "decoder_start_token_id": 0,
            "num_labels": 3,
        },
        eos_cls_batch,
        B.classification_loss,
    ),
    "gemma2-seq-cls": (
        "Gemma2ForSequenceClassification",
        {"num_labels": 3, "sliding_window": 4},
        B.cls_batch,
        B.classification_loss,
    ),
    "deberta-v2-token-cls": (
        "DebertaV2ForTokenClassification",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "num_labels": 3,
            "relative_attention": True,
            "position_buckets": 4,
            "pos_att_type": ["c2p", "p2c"],
        },
        token_cls_batch,
        token_cls_loss,
    ),
    "marian": (
        "MarianMTModel",
        {**_BART_LIKE, "decoder_start_token_id": 0, "decoder_vocab_size": B.VOCAB},
        B.seq2seq_batch,
        B.seq2seq_loss,
    ),
    "longformer-cls": (
        "LongformerForSequenceClassification",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "attention_window": [4, 4],
            "num_labels": 3,
            "pad_token_id": 1,
            "bos_token_id": 0,
        },
        B.cls_batch,
        B.classification_loss,
    ),
}


def _used_only(build: Any, batch: Any, loss: Any) -> Any:
    """``build`` with the parameters the loss never reaches frozen (Longformer's last layer
    reads only its global query/key/value for the CLS token): the matrix asserts that every
    trainable parameter gets a gradient."""

    def make() -> nn.Module:
        model = build()
        loss(model, batch(3, 0)).sum().backward()
        for p in model.parameters():
            if p.grad is None or not p.grad.any():
                p.requires_grad_(False)
            p.grad = None
        return model

    return make


def hf_new_case(arch: str) -> Case:
    cls, over, batch, loss = HF_NEW[arch]
    return Case(_used_only(lambda: B.build_hf(cls, over), batch, loss), batch, loss)


def mixtral_aux_case() -> Case:
    cls, over = B.CAUSAL_LMS["mixtral-moe"]
    return Case(
        lambda: B.build_hf(cls, {**over, "router_aux_loss_coef": 0.02}),
        B.lm_batch,
        moe_aux_loss,
    )


# -- peft ----------------------------------------------------------------------------------


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(6, 6, (1, 3), padding=(0, 1))
        self.norm = nn.LayerNorm(6)
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 11)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids).transpose(1, 2).unsqueeze(2)
        h = torch.tanh(self.conv(h)).squeeze(2).transpose(1, 2)
        return self.head(torch.tanh(self.fc(self.norm(h))))


def _peft_on(config: Any) -> Any:
    def make() -> nn.Module:
        import peft

        model = _seeded(Mixer)()
        torch.manual_seed(1)
        return peft.get_peft_model(model, config()).double().train()

    return make


def _cfg(name: str, **kw: Any) -> Any:
    def config() -> Any:
        import peft

        return getattr(peft, name)(**kw)

    return config


PEFT_NEW: dict[str, Case] = {
    "peft-dora-conv2d": Case(
        _peft_on(
            _cfg(
                "LoraConfig",
                r=2,
                lora_alpha=4,
                target_modules=["conv", "fc"],
                use_dora=True,
                init_lora_weights=False,
            )
        ),
        seq_tokens(5),
        seq_ce_loss,
    ),
    "peft-ln-tuning": Case(
        _peft_on(_cfg("LNTuningConfig", target_modules=["norm"])), seq_tokens(5), seq_ce_loss
    ),
    "peft-ia3-conv-fc": Case(
        _peft_on(
            _cfg(
                "IA3Config",
                target_modules=["conv", "fc"],
                feedforward_modules=["fc"],
                init_ia3_weights=False,
            )
        ),
        seq_tokens(5),
        seq_ce_loss,
    ),
    "peft-boft": Case(
        _peft_on(
            _cfg(
                "BOFTConfig",
                boft_block_size=2,
                target_modules=["fc"],
                boft_dropout=0.0,
                init_weights=False,
            )
        ),
        seq_tokens(5),
        seq_ce_loss,
    ),
    "peft-fourierft": Case(
        _peft_on(_cfg("FourierFTConfig", n_frequency=8, target_modules=["fc"], init_weights=False)),
        seq_tokens(5),
        seq_ce_loss,
    ),
}


def _ptuning_gpt2() -> nn.Module:
    import peft

    cls, over = B.CAUSAL_LMS["gpt2"]
    model = B.build_hf(cls, over)
    torch.manual_seed(1)
    cfg = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8
    )
    return peft.get_peft_model(model, cfg).double().train()


def ptuning_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    from dptrain.losses import token_nll

    return token_nll(out.logits[:, 3:], batch["labels"]).mean_per_sample


PEFT_NEW["peft-p-tuning-gpt2"] = Case(_ptuning_gpt2, B.lm_batch, ptuning_loss)


# -- dropout in train mode: the loop replays the batch's masks ---------------------------------

_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout}


class _RecordMasks(TorchFunctionMode):
    """Every dropout call's mask: the call drawn again, from the generator state it started
    from, on ones of the input's shape (``out != 0`` would not do: an input entry may be 0,
    GPT-2's attention output row of a query whose only weight was dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in _DROPOUT:
            return func(*args, **kwargs)
        before = torch.get_rng_state()
        out = func(*args, **kwargs)
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        with torch.no_grad():
            self.masks.append(func(torch.ones_like(args[0]), *args[1:], **kwargs) != 0)
        torch.set_rng_state(after)
        return out


class _ReplayMasks(TorchFunctionMode):
    """Dropout calls of a batch of one, sample ``b``, with the recorded masks' row ``b``."""

    def __init__(self, masks: list[Tensor], b: int) -> None:
        super().__init__()
        self.masks, self.b, self.k = masks, b, 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in _DROPOUT:
            return func(*args, **kwargs)
        x = args[0]
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        if not training or p == 0:
            return func(*args, **kwargs)
        mask = self.masks[self.k][self.b : self.b + 1]
        self.k += 1
        return x * mask.to(x.dtype) / (1 - p)


def dropout_reference(
    model: nn.Module, loss: Any, batch: Any, seeding: Any, clip: float, expected: float
) -> tuple[Reference, int]:
    """The per-example loop of a model with dropout in train mode: one forward of the batch
    inside ``seeding()`` (the generator state the engine's step forward starts from: its
    probes fork the generator) records every dropout mask, then each sample alone replays its
    rows of them.  Returns the clipped update and the number of dropout calls."""
    ref = copy.deepcopy(model)
    with seeding(), _RecordMasks() as rec:
        loss(ref, batch)
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    grads: dict[str, list[Tensor]] = {n: [] for n, _ in named}
    for b in range(batch_len(batch)):
        ref.zero_grad()
        with _ReplayMasks(rec.masks, b):
            loss(ref, batch_slice(batch, b, b + 1)).sum().backward()
        for n, p in named:
            grads[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    groups, clips = group_clips(ref, clip)
    stacked = {n: torch.stack(v) for n, v in grads.items()}
    return clipped_update(stacked, groups, clips, expected), len(rec.masks)


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)
        self.g = nn.Parameter(torch.randn(8))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.drop(torch.tanh(self.a(x))) * self.g)


class StackedLSTM(nn.Module):
    """Two single-layer LSTMs with ``nn.Dropout`` between them (what the refusal of
    ``LSTM(num_layers=2, dropout=p)`` advises)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.drop = nn.LSTM(4, 5, batch_first=True), nn.Dropout(0.5)
        self.l2, self.head = nn.LSTM(5, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.l1(x)
        h, _ = self.l2(self.drop(h))
        return self.head(h[:, -1])


def _lora_dropout() -> nn.Module:
    import peft

    model = _seeded(Mixer)()
    torch.manual_seed(1)
    cfg = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["fc", "head"], lora_dropout=0.5, init_lora_weights=False
    )
    return peft.get_peft_model(model, cfg).double().train()


def _gpt2_dropout() -> nn.Module:
    import transformers

    cls, over = B.CAUSAL_LMS["gpt2"]
    cfg = B.hf_config(cls, over)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.2
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().train()


DROPOUT_CASES: dict[str, Case] = {
    "dropout-mlp": Case(_seeded(DropoutMLP), regression((4,), 3), mse_loss),
    "dropout-stacked-lstm": Case(_seeded(StackedLSTM), regression((5, 4), 3), mse_loss),
    "peft-lora-dropout-0.5": Case(_lora_dropout, seq_tokens(5), seq_ce_loss),
    "gpt2-dropout-0.2": Case(_gpt2_dropout, B.lm_batch, causal_lm_loss),
}

REDTEAM_CASES["refuse-lstm-dropout-between-layers"] = Case(
    _seeded(lambda: B.Recurrent("LSTM", True, "out", num_layers=2, dropout=0.5)),
    regression((5, 4), 3),
    mse_loss,
    refuse="rnn",
)


# -- NumPy's generator in the forward pass: wav2vec2's SpecAugment time masks ------------------


def wav2vec2_masked() -> tuple[Any, Any, Any]:
    """wav2vec2 for classification with ``mask_time_prob = 0.5`` in train mode: its time masks
    come from ``np.random`` (``_compute_mask_indices``), which no torch hook sees."""
    from .builders_adversary import MORE_HF

    cls, over, batch, loss = MORE_HF["wav2vec2-cls"]
    over = {**over, "mask_time_prob": 0.5, "mask_time_length": 2, "mask_time_min_masks": 1}
    return (lambda: B.build_hf(cls, over)), batch, loss


def numpy_mask_reference(
    model: nn.Module, loss: Any, batch: Any, seed: int | list[int], clip: float, expected: float
) -> tuple[Reference, int]:
    """The loop for :func:`wav2vec2_masked`: the batch's masks drawn from
    ``np.random.seed(seed)`` are recorded, and each sample alone gets its row of them."""
    import numpy as np
    from transformers.models.wav2vec2 import modeling_wav2vec2 as mw

    ref, orig, masks = copy.deepcopy(model), mw._compute_mask_indices, []

    def recording(*a: Any, **k: Any) -> Any:
        masks.append(orig(*a, **k))
        return masks[-1]

    np.random.seed(seed)
    mw._compute_mask_indices = recording
    try:
        loss(ref, batch)
    finally:
        mw._compute_mask_indices = orig
    named = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    grads: dict[str, list[Tensor]] = {n: [] for n, _ in named}
    for b in range(batch_len(batch)):
        calls = iter(masks)
        mw._compute_mask_indices = lambda *a, b=b, calls=calls, **k: next(calls)[b : b + 1]
        try:
            ref.zero_grad()
            loss(ref, batch_slice(batch, b, b + 1)).sum().backward()
        finally:
            mw._compute_mask_indices = orig
        for n, p in named:
            grads[n].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    groups, clips = group_clips(ref, clip)
    stacked = {n: torch.stack(v) for n, v in grads.items()}
    return clipped_update(stacked, groups, clips, expected), len(masks)


# -- unpadded token rows (varlen): a gather the rows path takes for a flattened view -----------


class Unpadded(nn.Module):
    """Padding removed before a Linear, ``lin(h[mask])`` on (N, d), scattered back: the rows
    are sample-major but not in blocks of ``N / B``.  When ``N % B == 0`` and sample 0 has
    ``N / B`` tokens, the ``B + 1`` probe (its copy of sample 0 appended) repeats the rows in
    order and ends with sample 0's, so the fingerprint test of the rows path passes and the
    step splits the rows in equal blocks: sample 2 is credited with sample 1's last token."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        mask = x[..., 0] > -9  # padding: feature 0 set to -10
        h = torch.tanh(self.inp(x))
        out = h.new_zeros(h.shape)
        out[mask] = self.lin(h[mask])
        return self.head(torch.tanh(out).sum(1))


def varlen_batch(lengths: dict[int, list[int]]) -> Any:
    def make(b: int, seed: int) -> tuple[Tensor, Tensor]:
        g = B._gen(seed)
        x = torch.randn(b, 6, 4, generator=g, dtype=torch.float64)
        for i, n in enumerate(lengths[seed][:b]):
            x[i, n:, 0] = -10.0
        return x, torch.randn(b, 3, generator=g, dtype=torch.float64)

    return make


# (case, run_case kwargs): the probe batch ragged ([4, 5, 3]: 12 tokens, sample 0 has 12 / 3);
# the probe batch uniform ([4, 4, 4], rows truly in blocks) and the next one ragged
VARLEN_CASES: dict[str, tuple[Case, dict[str, Any]]] = {
    "varlen-rows-ragged-probe": (
        Case(_seeded(Unpadded), varlen_batch({0: [4, 5, 3]}), mse_loss),
        {"sizes": (3,)},
    ),
    "varlen-rows-uniform-then-ragged": (
        Case(_seeded(Unpadded), varlen_batch({0: [4, 4, 4], 1: [4, 2, 6]}), mse_loss),
        {"sizes": (3, 3)},
    ),
}
