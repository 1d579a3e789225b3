"""Sequence classification: a record's text and one label of the recipe's ``task.labels``.

Model: the recipe's language model with its LM head replaced by a sequence-classification
head (``AutoModelForSequenceClassification`` of the same config: the transformer's weights
are copied, the head ``score`` is initialized from ``recipe.seed``), pooled at the last real
token.  With LoRA the head is trained in full (peft ``modules_to_save``), the rest through
the adapters.  Loss: cross-entropy of each record (a per-sample loss, as the engine needs).
Metrics on the validation split: accuracy and macro-F1 (the mean over the labels that occur
in the validation truth or predictions of ``2 TP / (2 TP + FP + FN)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rng
from ..data.lm import pad_token_id
from .examples import TaskExamples, pad_rows
from .records import decode_record

if TYPE_CHECKING:
    from ..recipe import Recipe


def classification_head_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy per record of the pooled logits against its class index."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")


def encode_classification(
    ds: Any, tokenizer: Any, max_length: int, labels: list[str]
) -> TaskExamples:
    index = {label: i for i, label in enumerate(labels)}
    rows, classes, truncated = [], [], 0
    for text, rid in zip(ds.texts, ds.ids, strict=True):
        fields = decode_record(text, rid)
        if fields is None:
            raise ValueError(f"record {rid!r} is plain text, not a labelled record")
        ids = tokenizer(fields["text"], add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        rows.append(ids or [pad_token_id(tokenizer)])
        classes.append(index[fields["label"]])
    pad = pad_token_id(tokenizer)
    input_ids, mask, _ = pad_rows(rows, None, pad)
    target = torch.tensor(classes, dtype=torch.long)
    return TaskExamples(input_ids, mask, target, list(ds.ids), truncated, max_length, pad)


def build_classifier(recipe: Recipe) -> tuple[nn.Module, Any]:
    """The recipe's model with a classification head over ``task.labels`` (see the module
    docstring), in training mode, and its tokenizer; with ``training.gradient_checkpointing``
    its transformer recomputes activations in the backward pass (as for the LM tasks)."""
    from transformers import AutoModelForSequenceClassification

    from ..models import load_model_and_tokenizer

    labels = recipe.task.labels or []
    dtype = getattr(torch, recipe.model.dtype)
    with rng.seeded(recipe.seed):
        lm, tok = load_model_and_tokenizer(recipe.model.name, dtype=dtype)
        config = lm.config
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        config.pad_token_id = pad_token_id(tok)
        model = AutoModelForSequenceClassification.from_config(config)
        prefix = lm.base_model_prefix
        getattr(model, prefix).load_state_dict(getattr(lm, prefix).state_dict())
        del lm
        if recipe.lora is not None:
            from peft import LoraConfig, TaskType

            from ..models import wrap_lora

            cfg = LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=recipe.lora.r,
                lora_alpha=recipe.lora.alpha,
                lora_dropout=recipe.lora.dropout,
                target_modules=list(recipe.lora.target_modules),
            )
            model = wrap_lora(model, cfg)
    model.to(dtype)
    if recipe.training.gradient_checkpointing:  # the transformer's blocks; the head is not
        from ..models import enable_checkpointing

        enable_checkpointing(model)
    model.train()
    return model, tok


@torch.no_grad()
def classification_metrics(
    model: nn.Module, batches: list[dict[str, Tensor]], num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1 of the model's predictions on ``batches`` (moved to the model's
    device; the predictions come back to the CPU)."""
    from ..hardware import module_device, to_device

    was_training = model.training
    device = module_device(model)
    model.eval()
    preds, truth = [], []
    for b in batches:
        x = to_device(b, device)
        out = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        preds.append(out.logits.argmax(-1).cpu())
        truth.append(b["labels"])
    model.train(was_training)
    if not preds:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    p, t = torch.cat(preds), torch.cat(truth)
    return {"accuracy": float((p == t).float().mean()), "macro_f1": macro_f1(p, t, num_labels)}


def macro_f1(pred: Tensor, truth: Tensor, num_labels: int) -> float:
    """Mean F1 over the labels present in ``truth`` or ``pred``."""
    scores = []
    for c in range(num_labels):
        tp = int(((pred == c) & (truth == c)).sum())
        fp = int(((pred == c) & (truth != c)).sum())
        fn = int(((pred != c) & (truth == c)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


def load_classifier(recipe: Recipe, final: Any) -> tuple[nn.Module, Any]:
    """The released classifier of a run from its ``final/`` directory, in eval mode, and its
    tokenizer: the full model, or (with LoRA) the adapter and its trained head on the
    recipe's model with a classification head (:func:`build_classifier` without LoRA)."""
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    final = Path(final)
    dtype = getattr(torch, recipe.model.dtype)
    if recipe.lora is None:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(final), local_files_only=True, dtype=dtype
        )
        tok = AutoTokenizer.from_pretrained(str(final), local_files_only=True)
    else:
        from peft import PeftModel

        training = recipe.training.model_copy(update={"gradient_checkpointing": False})
        base, tok = build_classifier(recipe.model_copy(update={"lora": None, "training": training}))
        model = PeftModel.from_pretrained(base, str(final))
    model.eval()
    return model, tok
