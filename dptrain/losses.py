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
IGNORE_INDEX = -100  # a label that is no target


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token negative log-likelihood of each sequence over its labelled tokens
    predicted from attended positions (:func:`attended_targets`)."""
    mask = batch.get("attention_mask")
    out = model(input_ids=batch["input_ids"], attention_mask=mask)
    logits = out.logits if hasattr(out, "logits") else out
    return token_nll(logits, attended_targets(batch["labels"], mask)).mean_per_sample


def attended_targets(labels: Tensor, mask: Tensor | None) -> Tensor:
    """``labels`` (unshifted, ``(B, T)``) without the targets predicted from a padding
    position: label ``t + 1`` is predicted from position ``t``, so it is ignored where
    ``mask[t] == 0`` (a left-padded sequence's first token; right padding's are ignored
    already).  Counted, such a target would follow how far the batch pads its sample."""
    if mask is None or mask.shape != labels.shape:
        return labels
    out = labels.clone()
    out[:, 1:].masked_fill_(mask[:, :-1] == 0, IGNORE_INDEX)
    return out


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
    """Shifted next-token NLL: position ``t``'s logits against label ``t + 1``; labels of -100
    are ignored.

    On the CPU, when every sequence's last logits are finite, the cross-entropy runs on all
    ``T`` rows of the contiguous logits with the last row's label set to -100 (ignored: loss 0,
    gradient 0), and its last column is dropped.  The cross-entropy and its backward act on
    each row alone, so the losses and the logits' gradient are bit for bit those of the
    sliced ``(B, T - 1, V)`` form, without its two ``B T V`` copies (the slice made contiguous
    in the forward, the zero-filled slice gradient in the backward), each a fresh allocation
    that the CPU page-faults in.  A non-finite last row would make its (ignored) gradient NaN
    (softmax's backward multiplies ``exp(log p)`` by the row's zero gradient sum), so that case,
    and other devices (where the copies are cheap and the finiteness test would wait for the
    device), take the sliced form."""
    b, t, v = logits.shape
    targets = labels[:, 1:]
    full = logits.device.type == "cpu" and t > 0 and bool(torch.isfinite(logits[:, -1]).all())
    if full:
        shifted = F.pad(targets, (0, 1), value=-100)
        nll = F.cross_entropy(
            logits.reshape(-1, v).float(), shifted.reshape(-1), ignore_index=-100, reduction="none"
        ).view(b, t)[:, :-1]
    else:
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, v).float(),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(b, t - 1)
    return TokenNLL(nll, (targets != -100).to(nll.dtype))


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
