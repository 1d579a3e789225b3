"""Tokenized examples with explicit labels: one row per record (the privacy unit).

``labels`` is either per token, ``(N, T)`` with ``-100`` where no loss is taken (prompt and
padding), for the language-model tasks, or one class index per record, ``(N,)``, for
classification.  ``batch(indices)`` trims the rows to their longest sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.lm import IGNORE_INDEX, pad_batch


@dataclass(eq=False)
class TaskExamples:
    input_ids: torch.Tensor  # (N, T) right-padded
    attention_mask: torch.Tensor  # (N, T), 1 on real tokens
    labels: torch.Tensor  # (N, T) token targets with IGNORE_INDEX, or (N,) class indices
    ids: list[str] = field(default_factory=list)
    num_truncated: int = 0
    max_length: int | None = None
    pad_token_id: int = 0  # the id on padding positions (what pad_rows was given)

    def __post_init__(self) -> None:
        self.lengths = self.attention_mask.sum(dim=1)

    @property
    def truncated(self) -> int:
        return self.num_truncated

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long).reshape(-1)
        width = int(self.lengths[idx].max()) if idx.numel() else 0
        labels = self.labels[idx]
        return {
            "input_ids": self.input_ids[idx, :width],
            "attention_mask": self.attention_mask[idx, :width],
            "labels": labels[:, :width] if labels.dim() == 2 else labels,
        }

    def pad(self, batch: dict[str, torch.Tensor], length: int | None) -> dict[str, torch.Tensor]:
        """``batch`` (from :meth:`batch`) padded as :meth:`batch` pads, to ``length`` positions
        (None: trimmed to its longest sequence): :func:`~dptrain.data.lm.pad_batch`."""
        return pad_batch(batch, length, self.pad_token_id)


def pad_rows(
    rows: list[list[int]], targets: list[list[int]] | None, pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad token rows (and their per-token targets with ``IGNORE_INDEX``)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = (
        torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        if targets is not None
        else None
    )
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
        if labels is not None and targets is not None:
            labels[i, : len(r)] = torch.tensor(targets[i], dtype=torch.long)
    return ids, mask, labels
