"""Per-sample losses.  The engine back-propagates their sum, so ``grad of loss[b]`` is exactly
sample ``b``'s gradient; a loss that mixes samples (a batch mean over tokens) would not be."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]  # (model, batch) -> per-sample losses, shape (B,)


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token negative log-likelihood of each sequence over its labelled tokens."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logits = out.logits if hasattr(out, "logits") else out
    return token_nll(logits, batch["labels"]).mean_per_sample


class TokenNLL:
    """Token losses with their mask; ``mean_per_sample`` and ``sum_per_sample`` views."""

    def __init__(self, nll: Tensor, mask: Tensor) -> None:
        self.nll, self.mask = nll, mask

    @property
    def mean_per_sample(self) -> Tensor:
        return (self.nll * self.mask).sum(1) / self.mask.sum(1).clamp(min=1)

    @property
    def sum_per_sample(self) -> Tensor:
        return (self.nll * self.mask).sum(1)

    @property
    def tokens_per_sample(self) -> Tensor:
        return self.mask.sum(1)


def token_nll(logits: Tensor, labels: Tensor) -> TokenNLL:
    """Shifted next-token NLL; labels of -100 are ignored."""
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    b, t, v = logits.shape
    nll = F.cross_entropy(
        logits.reshape(-1, v).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(b, t)
    return TokenNLL(nll, (labels != -100).to(nll.dtype))


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy per sample for ``(inputs, targets)`` batches."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def mse_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Squared error per sample (summed over output dimensions)."""
    x, y = batch
    return (model(x) - y).pow(2).flatten(1).sum(1)


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[dict[str, Tensor]]) -> float:
    """Token-weighted perplexity over ``batches`` (moved to the model's device)."""
    from .hardware import module_device, to_device

    total, count = 0.0, 0.0
    was_training = model.training
    device = module_device(model)
    model.eval()
    for batch in batches:
        batch = to_device(batch, device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        t = token_nll(out.logits, batch["labels"])
        total += float(t.sum_per_sample.sum())
        count += float(t.tokens_per_sample.sum())
    model.train(was_training)
    mean = total / max(count, 1.0)  # mean token NLL, in float64
    return math.exp(mean) if mean < 709.0 else math.inf
