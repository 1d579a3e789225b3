"""Per-record statistics of a causal LM, the raw material of every attack.

For record ``x`` with next-token losses ``l_1..l_T`` (nats, over its labelled tokens, exactly as
in training: same tokenizer, ``max_length`` truncation and EOS):

- ``mean_nll = mean_t l_t`` (the training loss), ``sum_nll = sum_t l_t`` (log-perplexity);
- ``min_k``: the mean of the largest ``ceil(k T)`` token losses, i.e. of the ``k`` fraction of
  least likely tokens (Shi et al. 2024, "min-k% prob");
- ``log_prob = -mean_nll``, the log geometric-mean token probability: LiRA's statistic and
  RMIA's ``log Pr(x | theta)`` for a language model.
"""

from __future__ import annotations

import math
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dptrain.data import TextDataset, tokenize
from dptrain.hardware import module_device, to_device
from dptrain.losses import token_nll

__all__ = ["TextStats", "score_texts", "zlib_bits"]


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


@torch.no_grad()
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
) -> TextStats:
    """Forward every text through ``model`` (eval mode, no gradients) and collect its stats."""
    if not texts:
        empty = np.zeros(0)
        return TextStats(empty, empty, empty, empty.astype(int))
    ex = tokenize(
        TextDataset(list(texts), [str(i) for i in range(len(texts))]), tokenizer, max_length
    )
    was_training = model.training
    device = module_device(model)
    model.eval()
    mean, total, mink, count = [], [], [], []
    # longest first keeps padding low within a batch; results are put back in order
    order = torch.argsort(ex.lengths, descending=True, stable=True)
    bar = tqdm(
        total=len(texts), desc=desc, unit="rec", disable=not progress, file=sys.stderr, leave=False
    )
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = to_device(ex.batch(idx), device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t = token_nll(out.logits, batch["labels"])
        nll, mask = t.nll.double().cpu(), t.mask.bool().cpu()  # the stats on the CPU
        n = mask.sum(1)
        mean.append((nll * mask).sum(1) / n.clamp(min=1))
        total.append((nll * mask).sum(1))
        count.append(n)
        worst = torch.sort(nll.masked_fill(~mask, -math.inf), dim=1, descending=True).values
        k = torch.ceil(min_k * n.double()).clamp(min=1).long()
        keep = torch.arange(worst.shape[1])[None, :] < k[:, None]
        mink.append(torch.where(keep, worst, 0.0).sum(1) / k)
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    inverse = torch.argsort(order)
    cols = [torch.cat(c)[inverse].numpy() for c in (mean, total, mink, count)]
    return TextStats(cols[0], cols[1], cols[2], cols[3].astype(int))


def zlib_bits(texts: list[str]) -> np.ndarray:
    """zlib-compressed size of each text in bits (Carlini et al. 2021's zlib entropy)."""
    return np.array([8 * len(zlib.compress(t.encode("utf-8"), 9)) for t in texts], dtype=float)
