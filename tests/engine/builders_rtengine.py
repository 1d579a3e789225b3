"""Red-team cases (branch rtengine): models the engine got silently wrong or crashed on, and a
few layer options no other module of the matrix covers.

- peft LoRA on ``nn.MultiheadAttention`` merges its delta into the base layer for each forward
  (the frozen ``in_proj_weight`` deleted, a merged tensor set, a new Parameter registered
  after): the wrapper was re-run per sample, which read the unmerged weights (update 5.3e-01
  off the loop's) and left the frozen weights changed by up to 1.2.
- transformers' key/value and Mamba caches (``past_key_values``, created by the model when
  ``use_cache`` is on) are updated in place by each attention or Mamba call: a re-run per
  sample read, and extended, the batch's cache (GPT-OSS and Qwen3-Next crashed; Jamba and
  Bamba on a batch of one were silently wrong, 6.4e-05 and 3.0e-02).
- a layer applied across the batch axis (``Linear(B, B)`` on ``h.t()``) ran on the batch and
  failed on the probe's ``B + 1`` samples with the layer's own shape error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dptrain.losses import mse_loss

from . import builders as B
from .builders import Case, _seeded, conv_net, regression, seq_ce_loss, seq_tokens


class LinearOverBatch(nn.Module):
    """A Linear whose features are the batch's samples (``mix(h.t()).t()``): mixes samples,
    and runs only on batches of its ``in_features``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mix, self.head = nn.Linear(4, 6), nn.Linear(3, 3), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mix(self.a(x).t()).t())


class CumsumBatch(nn.Module):
    """A running sum over the batch axis (sample ``b`` sees samples ``0..b``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.a(x).cumsum(0))


class ScaleByFreq(nn.Module):
    """``Embedding(scale_grad_by_freq=True)``: each row's gradient divided by its count in the
    whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6, scale_grad_by_freq=True)
        self.head = nn.Linear(6, 11)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)))


class MHA(nn.Module):
    """``nn.MultiheadAttention`` with ``add_bias_kv`` and ``add_zero_attn``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(
            8, 2, batch_first=True, add_bias_kv=True, add_zero_attn=True
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x)[0].mean(1))


class FullTransformer(nn.Module):
    """``nn.Transformer`` (encoder and decoder, causal target mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(3, dtype=x.dtype)
        return self.head(self.t(x, x[:, :3], tgt_mask=mask).mean(1))


class PackedBidirectional(nn.Module):
    """A two-layer bidirectional GRU on a packed batch (lengths from the data, unsorted)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        lengths = (x[:, :, 0] > -0.5).sum(1).clamp(min=1)
        pack = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(pack)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(out.sum(1))


class WithMHA(nn.Module):
    """Embedding, ``nn.MultiheadAttention`` and head: a target for peft's LoRA on MHA."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 11)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        return self.head(self.attn(h, h, h)[0])


def _lora_mha() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = _seeded(WithMHA)()
    torch.manual_seed(1)
    cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["attn"], lora_dropout=0.0, init_lora_weights=False
    )
    return get_peft_model(model, cfg).double().train()


RT_CASES: dict[str, Case] = {
    "refuse-linear-over-batch": Case(
        _seeded(LinearOverBatch), regression((4,), 3), mse_loss, refuse="mix"
    ),
    "refuse-cumsum-over-batch": Case(
        _seeded(CumsumBatch), regression((4,), 3), mse_loss, refuse="a"
    ),
    "refuse-embedding-scale-grad-by-freq": Case(
        _seeded(ScaleByFreq), seq_tokens(5), seq_ce_loss, refuse="emb"
    ),
    "mha-bias-kv-zero-attn": Case(_seeded(MHA), regression((4, 8), 3), mse_loss),
    "nn-transformer": Case(_seeded(FullTransformer), regression((4, 8), 3), mse_loss),
    "gru-packed-bidirectional-2-layers": Case(
        _seeded(PackedBidirectional), regression((5, 4), 3), mse_loss
    ),
    "convtranspose2d-output-padding": Case(
        _seeded(
            lambda: conv_net(
                [nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), nn.Tanh()],
                3 * 8 * 8,
            )
        ),
        regression((2, 4, 4), 3),
        mse_loss,
    ),
    "peft-lora-multihead-attention": Case(_lora_mha, seq_tokens(5), seq_ce_loss),
}

# transformers models whose attention or Mamba layers update the cache they are handed
RT_HF: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt-oss": (
        "GptOssForCausalLM",
        {
            "num_local_experts": 3,
            "num_experts_per_tok": 2,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "experts_implementation": "eager",
        },
    ),
    "bamba": (
        "BambaForCausalLM",
        {
            "mamba_d_state": 4,
            "mamba_d_conv": 3,
            "mamba_expand": 2,
            "mamba_n_heads": 4,
            "mamba_d_head": 8,
            "mamba_n_groups": 1,
            "mamba_chunk_size": 4,
            "attn_layer_indices": [1],
        },
    ),
    "jamba": (
        "JambaForCausalLM",
        {
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "mamba_d_state": 4,
            "mamba_d_conv": 3,
            "mamba_expand": 2,
            "mamba_dt_rank": 4,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "experts_implementation": "eager",
        },
    ),
    "qwen3-next": (
        "Qwen3NextForCausalLM",
        {
            "num_experts": 3,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 8,
            "shared_expert_intermediate_size": 8,
            "linear_num_value_heads": 2,
            "linear_num_key_heads": 1,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "linear_conv_kernel_dim": 3,
            "layer_types": ["linear_attention", "full_attention"],
            "experts_implementation": "eager",
        },
    ),
}


def _used_only(build: Any) -> Any:
    """``build`` with the parameters the loss never reaches frozen (MoE experts no token of the
    first batch picks: the matrix asserts that every trainable parameter gets a gradient)."""

    def make() -> nn.Module:
        model = build()
        B.causal_lm_loss(model, B.lm_batch(3, 0)).sum().backward()
        for p in model.parameters():
            if p.grad is None or not p.grad.any():
                p.requires_grad_(False)
            p.grad = None
        return model

    return make


def rt_hf_case(arch: str) -> Case:
    cls, over = RT_HF[arch]
    return Case(_used_only(lambda: B.build_hf(cls, over)), B.lm_batch, B.causal_lm_loss)
