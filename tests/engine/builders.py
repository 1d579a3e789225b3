"""Tiny models, batches and per-sample losses for the exactness matrix.

Every builder returns a float64 model in train mode with every dropout at 0 (the loop and the
engine must compute the same function); batches are made by ``batch(B, seed)``.  Imported at
collection time by the test modules (parametrize ids), hence a module and not fixtures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dptrain.losses import LossFn, causal_lm_loss, mse_loss

VOCAB = 61


@dataclass
class Case:
    """One model of the matrix.  ``refuse``: the engine must refuse it, naming this layer."""

    build: Callable[[], nn.Module]
    batch: Callable[[int, int], Any]  # (batch size, seed) -> batch
    loss: LossFn
    refuse: str | None = None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def regression(shape: tuple[int, ...], out: int) -> Callable[[int, int], Any]:
    """``(x, y)`` batches: x of shape (B, *shape), targets (B, out)."""

    def make(b: int, seed: int) -> tuple[Tensor, Tensor]:
        g = _gen(seed)
        x = torch.randn(b, *shape, generator=g, dtype=torch.float64)
        return x, torch.randn(b, out, generator=g, dtype=torch.float64)

    return make


def ids_regression(length: int, out: int, vocab: int = 11) -> Callable[[int, int], Any]:
    def make(b: int, seed: int) -> tuple[Tensor, Tensor]:
        g = _gen(seed)
        ids = torch.randint(0, vocab, (b, length), generator=g)
        return ids, torch.randn(b, out, generator=g, dtype=torch.float64)

    return make


def seq_tokens(length: int, vocab: int = 11) -> Callable[[int, int], Any]:
    """``(ids, targets)``, both (B, T) token ids."""

    def make(b: int, seed: int) -> tuple[Tensor, Tensor]:
        g = _gen(seed)
        return (
            torch.randint(0, vocab, (b, length), generator=g),
            torch.randint(0, vocab, (b, length), generator=g),
        )

    return make


def seq_ce_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean token cross-entropy per sample, logits (B, T, V)."""
    ids, target = batch
    logits = model(ids)
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


def _init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic non-trivial values for every parameter and float buffer (norm weights
    away from 1, biases away from 0, BatchNorm statistics away from 0/1)."""
    g = _gen(seed + 12345)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for name, buf in model.named_buffers():
            if buf.is_floating_point() and name.endswith(("running_mean", "running_var")):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g, dtype=buf.dtype))
    return model


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return _init(factory()).double().train()

    return build


# -- torch.nn layers -----------------------------------------------------------------------


def conv_net(body: list[nn.Module], flat: int, out: int = 3) -> nn.Module:
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(flat, out))


class Recurrent(nn.Module):
    """A recurrent layer on batch-first data; reads the output sequence or the final state."""

    def __init__(self, kind: str, batch_first: bool, read: str, **kw: Any) -> None:
        super().__init__()
        self.batch_first, self.read = batch_first, read
        self.rnn = getattr(nn, kind)(4, 5, batch_first=batch_first, **kw)
        dirs = 2 if kw.get("bidirectional") else 1
        layers = kw.get("num_layers", 1)
        width = {"out": 5 * dirs, "hn": 5 * dirs * layers, "both": 5 * dirs * (1 + layers)}[read]
        if kind == "LSTM" and read != "out":
            width += 5 * dirs * layers  # c_n too
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        states = state if isinstance(state, tuple) else (state,)
        # h_n, c_n: (layers * dirs, B, H) -> (B, layers * dirs * H)
        finals = [s.transpose(0, 1).flatten(1) for s in states]
        parts = {"out": [out[:, -1]], "hn": finals, "both": [out[:, -1], *finals]}[self.read]
        return self.head(torch.cat(parts, 1))


class Attention(nn.Module):
    """Self-attention (or cross to a differently sized key) with ``nn.MultiheadAttention``."""

    def __init__(self, batch_first: bool, kdim: int | None = None) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.kv = nn.Linear(8, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(
            8, 2, dropout=0.0, batch_first=batch_first, kdim=kdim, vdim=kdim
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        kv = self.kv(x) if self.kv is not None else x
        if not self.batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        y, _ = self.attn(x, kv, kv, need_weights=False)
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(y.mean(1))


class Encoder(nn.Module):
    def __init__(self, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(x if self.batch_first else x.transpose(0, 1))
        return self.head((y if self.batch_first else y.transpose(0, 1)).mean(1))


class Bag(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 5, mode=mode)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bag(ids)))


class TiedFunctional(nn.Module):
    """An embedding whose weight is reused as the output layer through ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.emb(ids)))
        return F.linear(h, self.emb.weight)


class ScaledEmbedding(nn.Embedding):
    """A user subclass with its own forward (Gemma style): ``W[id] * sqrt(d)``."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * math.sqrt(self.embedding_dim)


class ScaledLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = ScaledEmbedding(11, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)))


class GainLinear(nn.Module):
    """A module owning a Parameter next to a child Linear: ``lin(x) * gain + shift``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.gain = nn.Parameter(torch.ones(d_out))
        self.shift = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.gain + self.shift


class TwiceLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class FunctionalParams(nn.Module):
    """Parameters used only through functional ops: ``F.linear(x, w)`` and ``x * scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) / 3)
        self.scale = nn.Parameter(torch.ones(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(F.linear(x, self.w)) * self.scale)


class PaddedLM(nn.Module):
    """An embedding with ``padding_idx`` (its row gets no gradient) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.head = nn.Linear(6, 11)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)))


class BilinearNet(nn.Module):
    """``nn.Bilinear`` on two views of the input (two inputs to one layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(4, 3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bil(x, x[:, :3] ** 2)))


class ProjectedLSTM(nn.Module):
    """An LSTM with ``proj_size`` (an extra recurrent projection weight), read through h_n."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 5, proj_size=3, batch_first=True)
        self.head = nn.Linear(3 + 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        _, (h, c) = self.rnn(x)
        return self.head(torch.cat([h[-1], c[-1]], 1))


class CellLoop(nn.Module):
    """An ``LSTMCell`` / ``GRUCell`` / ``RNNCell`` unrolled by hand: one layer called once per
    time step."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.cell = getattr(nn, kind)(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h, c = x.new_zeros(x.shape[0], 5), x.new_zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
        return self.head(h)


class MaskedAttention(nn.Module):
    """``nn.MultiheadAttention`` with a key padding mask taken from the data (x[..., 0] < -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        mask = x[..., 0] < -1.0
        mask[:, 0] = False  # every sample keeps one key
        y, _ = self.attn(x, x, x, key_padding_mask=mask, need_weights=False)
        return self.head(y.mean(1))


class Decoder(nn.Module):
    """``nn.TransformerDecoderLayer`` with a causal mask, its memory a projection of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.mem = nn.Linear(8, 8)
        self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        y = self.layer(x, torch.tanh(self.mem(x)), tgt_mask=causal, tgt_is_causal=True)
        return self.head(y.mean(1))


class BatchCenter(nn.Module):
    """A parameter-free layer that mixes samples: subtracts the batch mean."""

    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(0, keepdim=True)


class BatchMax(nn.Module):
    """Subtracts the batch maximum of each feature: unchanged when a sample is duplicated."""

    def forward(self, x: Tensor) -> Tensor:
        return x - x.amax(0, keepdim=True)


class BatchMaxNorm(nn.Module):
    """Divides by the largest sample norm of the batch: unchanged when a sample is duplicated."""

    def forward(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=1).amax()


class UniqueCenter(nn.Module):
    """Subtracts the mean of the batch's distinct samples (``torch.unique``, no gradient
    through it): unchanged when a sample is duplicated."""

    def forward(self, x: Tensor) -> Tensor:
        return x - torch.unique(x.detach(), dim=0).mean(0, keepdim=True)


class RowScale(nn.Module):
    """An elementwise scale and shift with a leading axis of 1, ``x * w + b`` with ``w`` and
    ``b`` of shape (1, d) against x of shape (B, d) (and (1, 1, d) against (B, T, d))."""

    def __init__(self, d: int, seq: bool) -> None:
        super().__init__()
        shape = (1, 1, d) if seq else (1, d)
        self.w = nn.Parameter(torch.ones(shape))
        self.b = nn.Parameter(torch.zeros(shape))

    def forward(self, x: Tensor) -> Tensor:
        y = x * self.w + self.b
        return y if y.dim() == 2 else torch.tanh(y).mean(1)


class FlatScale(nn.Module):
    """An elementwise scale on a flattened ``(B*T, d)`` view of a batch-first activation."""

    def __init__(self, lead: tuple[int, ...]) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.w = nn.Parameter(torch.ones(*lead, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        y = (h.reshape(-1, h.shape[-1]) * self.w).reshape(h.shape)
        return self.head(torch.tanh(y).mean(1))


class FusedAndDirect(nn.Module):
    """A weight used through its layer's ``F.linear`` and directly (``w.sum(1) * x``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + self.lin.weight.sum(1) * x[:, :3]


class FunctionalCallNet(nn.Module):
    """Parameters reached through ``torch.func.functional_call``: a layer run with a
    substituted weight (another parameter, scaled), then with its own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.w2 = nn.Parameter(torch.randn(4, 4) / 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        from torch.func import functional_call

        h = functional_call(self.lin, {"weight": self.w2 * 1.5}, (x,))
        h = functional_call(self.lin, dict(self.lin.named_parameters()), (torch.tanh(h),))
        return self.head(h)


class BatchAxisMoves(nn.Module):
    """One Linear called on (B, T, d), then on (T, B, d): its batch axis is 1 in the second."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(torch.tanh(self.lin(x)).transpose(0, 1))
        return self.head(h.mean(0))


def _with_bn(bn: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), bn, nn.Tanh(), nn.Linear(5, 3))


def _eval_bn_build() -> nn.Module:
    model = _seeded(lambda: _with_bn(nn.BatchNorm1d(5)))()
    model[1].eval()  # running statistics frozen and used: each sample is normalized alone
    return model


def _frozen_bn_build() -> nn.Module:
    model = _seeded(lambda: _with_bn(nn.BatchNorm1d(5)))()
    model[1].requires_grad_(False)
    return model


LAYER_CASES: dict[str, Case] = {
    "conv1d": Case(
        _seeded(
            lambda: conv_net(
                [nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 2, 3, stride=2)], 2 * 3
            )
        ),
        regression((3, 8), 3),
        mse_loss,
    ),
    "conv1d-grouped-dilated": Case(
        _seeded(lambda: conv_net([nn.Conv1d(4, 4, 3, groups=2, dilation=2, bias=False)], 4 * 4)),
        regression((4, 8), 3),
        mse_loss,
    ),
    "conv2d": Case(
        _seeded(
            lambda: conv_net(
                [nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, groups=2)],
                4 * 3 * 3,
            )
        ),
        regression((2, 7, 7), 3),
        mse_loss,
    ),
    "conv2d-padding-same": Case(
        _seeded(lambda: conv_net([nn.Conv2d(2, 3, (3, 2), padding="same", dilation=2)], 3 * 25)),
        regression((2, 5, 5), 3),
        mse_loss,
    ),
    "conv3d": Case(
        _seeded(lambda: conv_net([nn.Conv3d(2, 3, 2, stride=(1, 2, 1))], 3 * 3 * 2 * 3)),
        regression((2, 4, 4, 4), 3),
        mse_loss,
    ),
    "convtranspose1d": Case(
        _seeded(lambda: conv_net([nn.ConvTranspose1d(3, 2, 3, stride=2, output_padding=1)], 24)),
        regression((3, 5), 3),
        mse_loss,
    ),
    "convtranspose2d": Case(
        _seeded(lambda: conv_net([nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)], 3 * 49)),
        regression((2, 4, 4), 3),
        mse_loss,
    ),
    "convtranspose2d-grouped": Case(
        _seeded(lambda: conv_net([nn.ConvTranspose2d(4, 4, 2, groups=2, dilation=2)], 4 * 36)),
        regression((4, 4, 4), 3),
        mse_loss,
    ),
    "groupnorm": Case(
        _seeded(lambda: conv_net([nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh()], 4 * 4)),
        regression((2, 6), 3),
        mse_loss,
    ),
    "instancenorm1d": Case(
        _seeded(lambda: conv_net([nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, affine=True)], 16)),
        regression((2, 6), 3),
        mse_loss,
    ),
    "instancenorm2d": Case(
        _seeded(lambda: conv_net([nn.Conv2d(2, 3, 2), nn.InstanceNorm2d(3, affine=True)], 27)),
        regression((2, 4, 4), 3),
        mse_loss,
    ),
    "layernorm": Case(
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))),
        regression((4,), 3),
        mse_loss,
    ),
    "layernorm-2d-shape": Case(
        _seeded(
            lambda: nn.Sequential(
                nn.Linear(4, 5), nn.LayerNorm((3, 5)), nn.Flatten(), nn.Linear(15, 3)
            )
        ),
        regression((3, 4), 3),
        mse_loss,
    ),
    "rmsnorm": Case(
        _seeded(
            lambda: nn.Sequential(
                nn.Linear(4, 5), nn.RMSNorm(5, eps=1e-6), nn.Flatten(), nn.Linear(10, 3)
            )
        ),
        regression((2, 4), 3),
        mse_loss,
    ),
    "prelu": Case(
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))),
        regression((4,), 3),
        mse_loss,
    ),
    "prelu-channels": Case(
        _seeded(lambda: conv_net([nn.Conv1d(2, 3, 2), nn.PReLU(3)], 3 * 5)),
        regression((2, 6), 3),
        mse_loss,
    ),
    "embeddingbag-sum": Case(_seeded(lambda: Bag("sum")), ids_regression(4, 3), mse_loss),
    "embeddingbag-mean": Case(_seeded(lambda: Bag("mean")), ids_regression(4, 3), mse_loss),
    "embedding-tied-flinear": Case(_seeded(TiedFunctional), seq_tokens(5), seq_ce_loss),
    "embedding-subclass-scaled": Case(_seeded(ScaledLM), seq_tokens(5), seq_ce_loss),
    "mha-batch-first": Case(_seeded(lambda: Attention(True)), regression((4, 8), 3), mse_loss),
    "mha-seq-first": Case(_seeded(lambda: Attention(False)), regression((4, 8), 3), mse_loss),
    "mha-kdim": Case(_seeded(lambda: Attention(True, kdim=6)), regression((4, 8), 3), mse_loss),
    "transformer-encoder-layer": Case(
        _seeded(lambda: Encoder(True, False)), regression((4, 8), 3), mse_loss
    ),
    "transformer-encoder-layer-seq-first-norm-first": Case(
        _seeded(lambda: Encoder(False, True)), regression((4, 8), 3), mse_loss
    ),
    "mha-key-padding-mask": Case(_seeded(MaskedAttention), regression((4, 8), 3), mse_loss),
    "transformer-decoder-layer": Case(_seeded(Decoder), regression((4, 8), 3), mse_loss),
    "lstm-proj-size": Case(_seeded(ProjectedLSTM), regression((5, 4), 3), mse_loss),
    "lstm-cell-loop": Case(_seeded(lambda: CellLoop("LSTMCell")), regression((5, 4), 3), mse_loss),
    "gru-cell-loop": Case(_seeded(lambda: CellLoop("GRUCell")), regression((5, 4), 3), mse_loss),
    "rnn-cell-loop": Case(_seeded(lambda: CellLoop("RNNCell")), regression((5, 4), 3), mse_loss),
    "own-param-next-to-linear": Case(
        _seeded(lambda: nn.Sequential(GainLinear(4, 5), nn.Tanh(), nn.Linear(5, 3))),
        regression((4,), 3),
        mse_loss,
    ),
    "linear-called-twice": Case(_seeded(TwiceLinear), regression((5,), 3), mse_loss),
    "functional-params": Case(_seeded(FunctionalParams), regression((5,), 3), mse_loss),
    "embedding-padding-idx": Case(_seeded(PaddedLM), seq_tokens(5), seq_ce_loss),
    "conv1d-circular": Case(
        _seeded(lambda: conv_net([nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular")], 18)),
        regression((2, 6), 3),
        mse_loss,
    ),
    "bilinear": Case(_seeded(BilinearNet), regression((4,), 3), mse_loss),
    "elementwise-weight-leading-1": Case(
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), RowScale(5, False), nn.Linear(5, 3))),
        regression((4,), 3),
        mse_loss,
    ),
    "weight-fused-and-direct": Case(_seeded(FusedAndDirect), regression((4,), 3), mse_loss),
    "functional-call": Case(_seeded(FunctionalCallNet), regression((4,), 3), mse_loss),
    "linear-batch-axis-0-then-1": Case(_seeded(BatchAxisMoves), regression((5, 4), 3), mse_loss),
    "elementwise-flattened-rows": Case(
        _seeded(lambda: FlatScale(())), regression((3, 4), 3), mse_loss
    ),
    "elementwise-flattened-rows-leading-1": Case(
        _seeded(lambda: FlatScale((1,))), regression((3, 4), 3), mse_loss
    ),
    "elementwise-weight-leading-1-seq": Case(
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), RowScale(5, True), nn.Linear(5, 3))),
        regression((3, 4), 3),
        mse_loss,
    ),
    "batchnorm-eval": Case(_eval_bn_build, regression((4,), 3), mse_loss),
    # refusals: layers that mix samples, trainable or not, and running statistics of private data
    "refuse-batchnorm-train": Case(
        _seeded(lambda: _with_bn(nn.BatchNorm1d(5))), regression((4,), 3), mse_loss, refuse="1"
    ),
    "refuse-batchnorm-frozen-train": Case(
        _frozen_bn_build, regression((4,), 3), mse_loss, refuse="1"
    ),
    "refuse-batchnorm-running-stats": Case(
        _seeded(lambda: _with_bn(nn.BatchNorm1d(5, affine=False))),
        regression((4,), 3),
        mse_loss,
        refuse="1",
    ),
    "refuse-batch-mean": Case(
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), BatchCenter(), nn.Linear(5, 3))),
        regression((4,), 3),
        mse_loss,
        refuse="1",
    ),
    # invariant to duplicating a sample, so only removing samples shows the mixing
    "refuse-batch-max": Case(
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), BatchMax(), nn.Linear(5, 3))),
        regression((4,), 3),
        mse_loss,
        refuse="1",
    ),
    "refuse-batch-max-norm": Case(
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), BatchMaxNorm(), nn.Linear(5, 3))),
        regression((4,), 3),
        mse_loss,
        refuse="1",
    ),
    "refuse-unique-center": Case(
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), UniqueCenter(), nn.Linear(5, 3))),
        regression((4,), 3),
        mse_loss,
        refuse="1",
    ),
}

for _kind in ("RNN", "LSTM", "GRU"):
    for _bf in (True, False):
        for _read in ("out", "hn"):
            LAYER_CASES[f"{_kind.lower()}-{'batch' if _bf else 'seq'}-first-{_read}"] = Case(
                _seeded(lambda k=_kind, b=_bf, r=_read: Recurrent(k, b, r)),
                regression((5, 4), 3),
                mse_loss,
            )
LAYER_CASES["lstm-bidirectional-2-layers"] = Case(
    _seeded(lambda: Recurrent("LSTM", True, "both", bidirectional=True, num_layers=2)),
    regression((5, 4), 3),
    mse_loss,
)
LAYER_CASES["gru-seq-first-bidirectional-2-layers"] = Case(
    _seeded(lambda: Recurrent("GRU", False, "both", bidirectional=True, num_layers=2)),
    regression((5, 4), 3),
    mse_loss,
)


class Checkpointed(nn.Module):
    """``inner`` run under ``torch.utils.checkpoint`` (the input made to require grad, as
    ``enable_input_require_grads`` does, so that reentrant checkpointing back-propagates)."""

    def __init__(self, inner: nn.Module, use_reentrant: bool) -> None:
        super().__init__()
        self.inner, self.use_reentrant = inner, use_reentrant

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            x = x.detach().requires_grad_()
        return checkpoint(self.inner, x, use_reentrant=self.use_reentrant)


# -- transformers models ---------------------------------------------------------------------

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}

# architecture -> (model class, overrides of _COMMON; None drops a key)
CAUSAL_LMS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("GPT2LMHeadModel", {"head_dim": None, "num_key_value_heads": None}),
    "llama": ("LlamaForCausalLM", {}),
    "mistral": ("MistralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "gemma": ("GemmaForCausalLM", {}),
    "gemma2": ("Gemma2ForCausalLM", {"sliding_window": 4}),
    "gemma3": ("Gemma3ForCausalLM", {"sliding_window": 4}),
    "phi": ("PhiForCausalLM", {"head_dim": None, "tie_word_embeddings": False}),
    "phi3": ("Phi3ForCausalLM", {}),
    "opt": (
        "OPTForCausalLM",
        {"head_dim": None, "num_key_value_heads": None, "ffn_dim": 32, "word_embed_proj_dim": 16},
    ),
    "gpt-neox": (
        "GPTNeoXForCausalLM",
        {"head_dim": None, "num_key_value_heads": None, "tie_word_embeddings": False},
    ),
    "falcon": ("FalconForCausalLM", {"head_dim": None, "num_key_value_heads": None}),
    "falcon-new-arch": (
        "FalconForCausalLM",
        {
            "head_dim": None,
            "new_decoder_architecture": True,
            "num_kv_heads": 1,
            "num_key_value_heads": None,
        },
    ),
    "bloom": ("BloomForCausalLM", {"head_dim": None, "num_key_value_heads": None}),
    "gpt-j": (
        "GPTJForCausalLM",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "rotary_dim": 4,
            "tie_word_embeddings": False,
        },
    ),
    "gpt-bigcode": ("GPTBigCodeForCausalLM", {"head_dim": None, "num_key_value_heads": None}),
    "codegen": (
        "CodeGenForCausalLM",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "num_attention_heads": 4,
            "rotary_dim": 4,
            "tie_word_embeddings": False,
        },
    ),
    "stablelm": ("StableLmForCausalLM", {}),
    "starcoder2": ("Starcoder2ForCausalLM", {}),
    "cohere": ("CohereForCausalLM", {}),
    "olmo2": ("Olmo2ForCausalLM", {}),
    "granite": ("GraniteForCausalLM", {}),
    "mpt": ("MptForCausalLM", {"head_dim": None, "num_key_value_heads": None}),
    "persimmon": ("PersimmonForCausalLM", {"head_dim": None}),
    "nemotron": ("NemotronForCausalLM", {}),
    "biogpt": ("BioGptForCausalLM", {"head_dim": None, "num_key_value_heads": None}),
    "mixtral-moe": (
        "MixtralForCausalLM",
        {"num_local_experts": 3, "num_experts_per_tok": 2, "experts_implementation": "eager"},
    ),
    "qwen3-moe": (
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 3,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 8,
            "experts_implementation": "eager",
        },
    ),
    "mamba": (
        "MambaForCausalLM",
        {"head_dim": None, "state_size": 4, "expand": 2, "conv_kernel": 3},
    ),
}


def _zero_dropout(cfg: Any) -> None:
    for key in list(cfg.to_dict()):
        low = key.lower()
        if ("drop" in low or low.endswith("pdrop")) and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def hf_config(cls_name: str, overrides: dict[str, Any]) -> Any:
    import transformers

    cls = getattr(transformers, cls_name)
    kw = {**_COMMON, **overrides}
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = cls.config_class(**kw)
    _zero_dropout(cfg)
    cfg._attn_implementation = "eager"
    return cfg


def build_hf(cls_name: str, overrides: dict[str, Any], seed: int = 0) -> nn.Module:
    import transformers

    cfg = hf_config(cls_name, overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg)
    return model.double().train()


def lm_batch(b: int, seed: int, length: int = 6) -> dict[str, Tensor]:
    """Token ids avoiding the special ids 0-2, ragged right padding, labels -100 on padding."""
    g = _gen(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    for i in range(b):
        k = int(torch.randint(3, length + 1, (1,), generator=g))
        mask[i, k:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def cls_batch(b: int, seed: int, length: int = 6) -> dict[str, Tensor]:
    batch = lm_batch(b, seed, length)
    batch["labels"] = torch.randint(0, 3, (b,), generator=_gen(seed + 1))
    return batch


def seq2seq_batch(b: int, seed: int, length: int = 5, target: int = 4) -> dict[str, Tensor]:
    src = lm_batch(b, seed, length)
    tgt = lm_batch(b, seed + 1, target)
    return {
        "input_ids": src["input_ids"],
        "attention_mask": src["attention_mask"],
        "labels": tgt["labels"],
    }


def classification_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits, batch["labels"], reduction="none")


def seq2seq_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean token NLL per sample; the decoder input is the right-shifted labels."""
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    nll = F.cross_entropy(
        out.logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none"
    )
    mask = (labels != -100).to(nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


OTHER_HF: dict[str, tuple[str, dict[str, Any], Callable[[int, int], Any], LossFn]] = {
    "bert-cls": (
        "BertForSequenceClassification",
        {"head_dim": None, "num_key_value_heads": None, "num_labels": 3},
        cls_batch,
        classification_loss,
    ),
    "roberta-cls": (
        "RobertaForSequenceClassification",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "num_labels": 3,
            "pad_token_id": 1,
            "bos_token_id": 0,
        },
        cls_batch,
        classification_loss,
    ),
    "t5": (
        "T5ForConditionalGeneration",
        {
            "head_dim": None,
            "num_key_value_heads": None,
            "d_model": 16,
            "d_kv": 8,
            "d_ff": 32,
            "num_layers": 2,
            "num_heads": 2,
            "relative_attention_num_buckets": 8,
            "decoder_start_token_id": 0,
        },
        seq2seq_batch,
        seq2seq_loss,
    ),
    "bart": (
        "BartForConditionalGeneration",
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
            "decoder_start_token_id": 2,
            "forced_eos_token_id": None,
        },
        seq2seq_batch,
        seq2seq_loss,
    ),
}


def hf_case(arch: str) -> Case:
    if arch in CAUSAL_LMS:
        cls, over = CAUSAL_LMS[arch]
        return Case(lambda: build_hf(cls, over), lm_batch, causal_lm_loss)
    cls, over, batch, loss = OTHER_HF[arch]
    return Case(lambda: build_hf(cls, over), batch, loss)


# -- LoRA --------------------------------------------------------------------------------------


def _embedding_name(model: nn.Module) -> str:
    """The leaf name of the input token embedding as the forward calls it (an encoder-decoder's
    ``shared`` module is only the tied source of its ``embed_tokens``, never called)."""
    if getattr(model.config, "is_encoder_decoder", False):
        leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        if "embed_tokens" in leaves:
            return "embed_tokens"
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb).rsplit(".", 1)[-1]


_QV_NAMES = (
    ("q_proj", "v_proj"),
    ("qkv_proj",),
    ("query_key_value",),
    ("Wqkv",),
    ("c_attn",),
    ("in_proj",),
)


def lora_targets(model: nn.Module) -> list[str] | None:
    """peft's default (q/v style) targets for the model type, else the first of the usual
    attention projection names that the model has; None if it has none of them."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    targets = MAP.get(model.config.model_type)
    if isinstance(targets, list):
        return list(targets)
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return next((list(c) for c in _QV_NAMES if set(c) <= leaves), None)


LORA_KINDS = ("qv", "all-linear", "embedding", "modules-to-save", "dora")


def with_lora(model: nn.Module, kind: str, task: str | None = None) -> nn.Module:
    """``qv``: peft's default targets; ``all-linear``; ``embedding``: q/v plus a LoRA on the
    input embedding; ``modules-to-save``: q/v plus a trained copy of the input embedding;
    ``dora``: q/v with DoRA (a trained magnitude vector per output)."""
    qv = lora_targets(model)
    if kind != "all-linear" and qv is None:
        raise ValueError(f"no q/v LoRA targets known for {model.config.model_type}")
    emb = _embedding_name(model)
    targets: Any = {
        "qv": qv,
        "all-linear": "all-linear",
        "embedding": [*(qv or []), emb],
        "modules-to-save": qv,
        "dora": qv,
    }[kind]
    save = [emb] if kind == "modules-to-save" else None
    return peft_lora(model, targets, modules_to_save=save, task=task, use_dora=kind == "dora")


def peft_lora(
    model: nn.Module,
    targets: Any,
    *,
    modules_to_save: list[str] | None = None,
    task: str | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """peft LoRA, rank 2, random (not zero) B so that every adapter has a gradient."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=targets,
        modules_to_save=modules_to_save,
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type=task,
        use_dora=use_dora,
    )
    return get_peft_model(model, cfg).double().train()


def _peft_case(case: Case, targets: list[str], use_dora: bool = False) -> Case:
    return Case(lambda: peft_lora(case.build(), targets, use_dora=use_dora), case.batch, case.loss)


# peft adapters on torch.nn layers (LoRA on Conv and Embedding, DoRA on Linear)
LAYER_CASES["peft-lora-conv1d"] = _peft_case(LAYER_CASES["conv1d"], ["0", "2"])
LAYER_CASES["peft-lora-conv2d"] = _peft_case(LAYER_CASES["conv2d"], ["0", "2"])
LAYER_CASES["peft-lora-embedding"] = _peft_case(LAYER_CASES["embedding-padding-idx"], ["emb"])
LAYER_CASES["peft-dora-linear"] = _peft_case(LAYER_CASES["layernorm"], ["0", "2"], use_dora=True)
