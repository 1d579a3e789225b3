"""Shared test support: tiny models and batches, the explicit per-example reference loop, the
engine's per-sample gradients materialized, seeded (NOT private) noise and coins, and a small
engine factory.  Imported by test modules as ``from tests._support import ...``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from dptrain.batching import batch_len, batch_slice
from dptrain.engine import PrivacyEngine
from dptrain.grad_sample import Recorded
from dptrain.losses import causal_lm_loss
from dptrain.policies import StaticPolicy


def loop_per_sample_grads(
    model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any
) -> dict[nn.Parameter, Tensor]:
    """The reference: one backward per example, gradients stacked."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows: list[list[Tensor]] = []
    for b in range(batch_len(batch)):
        for p in params:
            p.grad = None
        loss = loss_fn(model, batch_slice(batch, b, b + 1)).sum()
        loss.backward()
        rows.append(
            [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        )
    for p in params:
        p.grad = None
    return {p: torch.stack([r[i] for r in rows]) for i, p in enumerate(params)}


def per_sample_grads(recorded: Recorded) -> dict[nn.Parameter, Tensor]:
    """The engine's per-sample gradients of one chunk, materialized: ``{param: (B, *shape)}``,
    the rule's rows of every use plus the Jacobian rows of direct uses, summed."""
    out: dict[nn.Parameter, Tensor] = {}
    for use in recorded.uses:
        for role, g in use.rule.per_sample(use).items():
            if role in use.params:
                p = use.params[role]
                out[p] = out[p] + g if p in out else g
    for p, g in recorded.direct.items():
        out[p] = out[p] + g if p in out else g
    return out


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """|actual - expected| <= rtol * max|expected| (+ a tiny absolute floor)."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale + 1e-12, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def tiny_gpt2(vocab: int = 61, layers: int = 2, width: int = 16, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).double().eval()


def tiny_llama(vocab: int = 61, layers: int = 2, width: int = 16, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).double().eval()


def lm_batch(
    vocab: int, batch: int, length: int, seed: int = 0, ragged: bool = True
) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if ragged and length > 2:
        for b in range(batch):
            k = int(torch.randint(2, length + 1, (1,), generator=g))
            mask[b, k:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def seeded_noise(seed: int):
    """A reproducible noise source (``privacy.insecure_seed``): NOT private, for tests only."""
    from dptrain.noise import GaussianNoise
    from dptrain.secret import RunKey

    return GaussianNoise(RunKey.from_insecure_seed(seed))


def seeded_sampler(n: int, q: float, seed: int):
    """A reproducible Poisson sampler over records ``"0" .. str(n - 1)`` (NOT private)."""
    from dptrain.sampling import PoissonSampler
    from dptrain.secret import RunKey

    return PoissonSampler([str(i) for i in range(n)], q, RunKey.from_insecure_seed(seed))


def share_key(src_run: Any, dst_run: Any) -> None:
    """Give the run directory ``dst_run`` (not started yet) the secret key of ``src_run``, so
    that a second run draws the same coins and noise (to compare a resumed run with an
    uninterrupted one)."""
    from pathlib import Path

    from dptrain.secret import KEY_FILE, RunKey

    RunKey.read(Path(src_run) / KEY_FILE).write(Path(dst_run) / KEY_FILE)


def lora(model: nn.Module, targets: list[str]) -> nn.Module:
    """``model`` wrapped in rank-2 LoRA adapters on ``targets`` (non-zero initial B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=2, target_modules=targets, init_lora_weights=False))


def make(
    model: nn.Module,
    *,
    sigma: float = 0.0,
    clip: float = 0.1,
    n: int = 3,
    q: float = 1.0,
    grouping: str = "flat",
    opt: str = "sgd",
    loss: Callable[[nn.Module, Any], Tensor] = causal_lm_loss,
    policy: Any = None,
    **kw: Any,
) -> Any:
    """A :class:`~dptrain.engine.PrivacyEngine` on ``model`` (a static policy with ``clip`` and
    ``sigma`` unless ``policy`` is given)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = {
        "sgd": lambda: torch.optim.SGD(params, lr=1.0),
        "adam": lambda: torch.optim.Adam(params, lr=1e-2),
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-2),
    }[opt]()
    return PrivacyEngine(
        model,
        optimizer,
        policy=policy or StaticPolicy(clip=clip, noise_multiplier=sigma),
        sample_rate=q,
        dataset_size=n,
        loss_fn=loss,
        grouping=grouping,
        **kw,
    )


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
