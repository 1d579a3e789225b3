"""Per-record statistics of a model, the raw material of every attack.

Records are encoded by the run's task (:meth:`dptrain.tasks.Task.encode`, the function
``dptrain train`` builds its examples with), so a record is scored as the model saw it: an
instruction or chat record through its chat template with labels only on the response tokens,
a canary (id ``canary-...``) as plain text on every token.  For record ``x`` with next-token
losses ``l_1..l_T`` (nats, over its labelled tokens, exactly as in training: same tokenizer,
``max_length`` truncation and EOS):

- ``mean_nll = mean_t l_t`` (the training loss), ``sum_nll = sum_t l_t`` (the
  Secret Sharer's log-perplexity of the sequence, in nats; Carlini et al. 2021 call
  ``mean_nll`` the log-perplexity);
- ``min_k``: the mean of the largest ``ceil(k T)`` token losses, i.e. of the ``k`` fraction of
  least likely tokens (Shi et al. 2024, "min-k% prob");
- ``log_prob = -mean_nll``, the log geometric-mean token probability: LiRA's statistic and
  RMIA's ``log Pr(x | theta)`` for a language model.

A classification record has one target, its label: ``mean_nll = sum_nll = min_k`` is the
task's training loss (the cross-entropy of the label, :attr:`dptrain.tasks.Task.loss_fn`) and
``tokens = 1``.

A record with no scored token (``tokens = 0``: an instruction or chat record whose responses
``max_length`` cut off entirely, or a one-token text) has no loss: its statistics are NaN, not
0 (a loss of 0 would read as a perfect member).  Training gives it a zero gradient; the audits
leave it out of the attacks and count it (:func:`scored_tokens` tells them before scoring).
"""

from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dptrain.data import IGNORE_INDEX, TextDataset
from dptrain.hardware import module_device, to_device
from dptrain.losses import token_nll
from dptrain.tasks import Task, TaskSection

__all__ = [
    "TextStats",
    "encode_texts",
    "score_examples",
    "score_texts",
    "scored_tokens",
    "trained_texts",
    "zlib_bits",
]

TEXT = Task(TaskSection())  # plain text, every token trained (the default task)


@dataclass
class TextStats:
    """Arrays over records (see the module docstring)."""

    mean_nll: np.ndarray
    sum_nll: np.ndarray
    min_k: np.ndarray
    tokens: np.ndarray

    @property
    def log_prob(self) -> np.ndarray:
        return -self.mean_nll

    def take(self, index: np.ndarray) -> TextStats:
        return TextStats(
            *(a[index] for a in (self.mean_nll, self.sum_nll, self.min_k, self.tokens))
        )

    def to_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)

    @staticmethod
    def concat(parts: list[TextStats]) -> TextStats:
        return TextStats(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in TextStats.__dataclass_fields__
            )
        )


def encode_texts(task: Task, tokenizer, texts: list[str], ids: list[str] | None, max_length: int):
    """The records as ``task`` encodes them for training; ``ids`` (default ``0..n-1``) matter
    only through their prefix (``canary-`` records are plain text in every task)."""
    rids = [str(i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
    return task.encode(TextDataset(list(texts), rids), tokenizer, max_length)


def scored_tokens(ex) -> np.ndarray:
    """The number of tokens each encoded record (``ex``, the task's examples) is scored on:
    its labelled targets as :func:`dptrain.losses.token_nll` takes them (positions ``1..``),
    or 1 for a classification record (its label)."""
    labels = ex.batch(range(len(ex)))["labels"]
    if labels.dim() == 1:
        return np.ones(len(ex), dtype=int)
    return (labels[:, 1:] != IGNORE_INDEX).sum(1).numpy().astype(int)


def score_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    *,
    max_length: int,
    min_k: float = 0.2,
    batch_size: int = 16,
    desc: str = "scoring",
    progress: bool = True,
    task: Task = TEXT,
    ids: list[str] | None = None,
) -> TextStats:
    """Encode ``texts`` (records of ``task``, ids ``ids``) as training does and score them
    with :func:`score_examples`."""
    if not texts:
        empty = np.zeros(0)
        return TextStats(empty, empty, empty, empty.astype(int))
    ex = encode_texts(task, tokenizer, texts, ids, max_length)
    return score_examples(
        model, ex, task, min_k=min_k, batch_size=batch_size, desc=desc, progress=progress
    )


@torch.no_grad()
def score_examples(
    model: torch.nn.Module,
    ex,
    task: Task = TEXT,
    *,
    min_k: float = 0.2,
    batch_size: int = 16,
    desc: str = "scoring",
    progress: bool = True,
) -> TextStats:
    """Forward every example of ``ex`` (the task's encoded records) through ``model`` (eval
    mode, no gradients) and collect its stats (see the module docstring)."""
    n_rec = len(ex)
    was_training = model.training
    device = module_device(model)
    model.eval()
    mean, total, mink, count = [], [], [], []
    # longest first keeps padding low within a batch; results are put back in order
    order = torch.argsort(ex.lengths, descending=True, stable=True)
    bar = tqdm(
        total=n_rec, desc=desc, unit="rec", disable=not progress, file=sys.stderr, leave=False
    )
    for start in range(0, n_rec, batch_size):
        idx = order[start : start + batch_size]
        batch = to_device(ex.batch(idx), device)
        if batch["labels"].dim() == 1:  # one class per record: the task's own loss
            loss = task.loss_fn(model, batch).double().cpu()
            mean.append(loss)
            total.append(loss)
            mink.append(loss)
            count.append(torch.ones(len(idx), dtype=torch.long, device="cpu"))
            bar.update(len(idx))
            continue
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t = token_nll(out.logits, batch["labels"])  # as causal_lm_loss, token by token
        nll, mask = t.nll.double().cpu(), t.mask.bool().cpu()  # the stats on the CPU
        n = mask.sum(1)
        none = n == 0  # no loss to score: NaN (see the module docstring), never 0
        mean.append(((nll * mask).sum(1) / n.clamp(min=1)).masked_fill(none, math.nan))
        total.append((nll * mask).sum(1).masked_fill(none, math.nan))
        count.append(n)
        worst = torch.sort(nll.masked_fill(~mask, -math.inf), dim=1, descending=True).values
        k = torch.ceil(min_k * n.double()).clamp(min=1).long()
        keep = torch.arange(worst.shape[1], device="cpu")[None, :] < k[:, None]
        mink.append((torch.where(keep, worst, 0.0).sum(1) / k).masked_fill(none, math.nan))
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    inverse = torch.argsort(order)
    cols = [torch.cat(c)[inverse].numpy() for c in (mean, total, mink, count)]
    return TextStats(cols[0], cols[1], cols[2], cols[3].astype(int))


def trained_texts(
    task: Task, tokenizer, texts: list[str], ids: list[str] | None, max_length: int
) -> list[str] | None:
    """What the loss is taken on, as text, for the zlib attack: the record itself for plain
    text; for instruction and chat records the decoded target tokens (the responses, after
    truncation); None for classification (a label, not a sequence)."""
    if task.kind == "classification":
        return None
    if task.kind == "text":
        return list(texts)
    ex = encode_texts(task, tokenizer, texts, ids, max_length)
    out = []
    for row, labels in zip(ex.input_ids, ex.labels, strict=True):
        # token_nll's targets: the tokens at positions 1.. that carry a label
        keep = row[1:][labels[1:] != IGNORE_INDEX]
        out.append(tokenizer.decode(keep.tolist()))
    return out


def zlib_bits(texts: list[str]) -> np.ndarray:
    """zlib-compressed size of each text in bits (Carlini et al. 2021's zlib entropy)."""
    return np.array([8 * len(zlib.compress(t.encode("utf-8"), 9)) for t in texts], dtype=float)
