"""Per-sample losses for Hugging Face batches (dicts of tensors, as a Trainer collator gives).

The engine back-propagates ``sum_b loss_b``, so each ``loss_b`` must depend on sample ``b``
alone; ``Trainer.compute_loss`` returns a batch mean (over tokens, across samples), which is
used for evaluation only.

    causal LM:       loss_b = mean over b's labelled tokens of CE(logits_t, label_{t+1}), for
                     attended t (a left-padded sequence's first token, predicted from a
                     padding position, is not counted: its padded length would decide)
    classification:  loss_b = CE(logits_b, label_b)  (regression, ``num_labels == 1``:
                     (logit_b - label_b)^2)

``label_smoothing`` is ``torch.nn.functional.cross_entropy``'s, applied per token or sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...losses import IGNORE_INDEX, LossFn, attended_targets
from .arguments import DPTrainerError


def _upcast(t: Tensor) -> Tensor:
    """Half-precision logits in float32; float32 and float64 as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def causal_lm_loss(label_smoothing: float = 0.0) -> LossFn:
    """Mean next-token cross-entropy of each sequence over its labelled tokens (labels of
    -100 are ignored; without ``labels``, every attended token is a target)."""

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = model(**_model_inputs(batch))
        logits = out.logits if hasattr(out, "logits") else out
        labels = batch.get("labels")
        mask = batch.get("attention_mask")
        if labels is None:
            labels = batch["input_ids"]
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        labels = attended_targets(labels, mask)  # none predicted from a padding position
        logits, labels = logits[:, :-1], labels[:, 1:]
        b, t, v = logits.shape
        nll = F.cross_entropy(
            _upcast(logits.reshape(-1, v)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
            label_smoothing=label_smoothing,
        ).view(b, t)
        keep = (labels != IGNORE_INDEX).to(nll.dtype)
        return (nll * keep).sum(1) / keep.sum(1).clamp(min=1)

    return loss


def sequence_classification_loss(label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy of each sample's logits against its label; squared error for a
    single-output (regression) head."""

    def loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        out = model(**_model_inputs(batch))
        logits = out.logits if hasattr(out, "logits") else out
        labels = batch["labels"]
        if logits.shape[-1] == 1:
            out = _upcast(logits.squeeze(-1))
            return (out - labels.to(out.dtype)).pow(2)
        return F.cross_entropy(
            _upcast(logits), labels.long(), reduction="none", label_smoothing=label_smoothing
        )

    return loss


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # peft
    return get() if callable(get) else model


def default_loss(model: nn.Module, label_smoothing: float = 0.0) -> LossFn:
    """The per-sample loss for a causal-LM or sequence-classification model, by its head."""
    name = type(_base_model(model)).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return causal_lm_loss(label_smoothing)
    if name.endswith("ForSequenceClassification"):
        return sequence_classification_loss(label_smoothing)
    raise DPTrainerError(
        f"loss_fn: no built-in per-sample loss for {name} (causal LMs and sequence "
        "classifiers have one). Fix: pass DPTrainer(..., loss_fn=f) with f(model, batch) -> "
        "one loss per sample, shape (B,)"
    )
