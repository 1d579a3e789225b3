"""Tokenized causal-LM examples with one record per example (the privacy unit).

Each record becomes exactly one sequence: its tokens (with the tokenizer's own special
tokens, e.g. a BOS for tokenizers that add one), then EOS when ``add_eos`` is set. Records
are never packed together, because a packed sequence would mix several privacy units into
one per-example gradient. A record longer than ``max_length`` is truncated to its first
``max_length`` tokens (a truncated record therefore has no EOS), or, with
``on_overflow="error"``, raises :class:`SequenceTooLongError`.

Padding uses the tokenizer's pad token, or its EOS token when it has none (a common
convention for decoder-only LMs such as GPT-2 and Llama). Padding is on the right and is
excluded from the loss through ``attention_mask`` (not by comparing with the pad id, so a
real EOS equal to the pad id still counts as a target).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from dptrain.data.loading import TextDataset
from dptrain.errors import UserError
from dptrain.losses import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "PAD_FILL",
    "LMExamples",
    "SequenceTooLongError",
    "UnpaddableFields",
    "pad_batch",
    "pad_token_id",
    "tokenize",
]

log = logging.getLogger(__name__)


class SequenceTooLongError(UserError, ValueError):
    """A record does not fit in ``max_length`` tokens and truncation was not allowed."""


@dataclass(eq=False)
class LMExamples(Dataset):
    """Padded token tensors, one row per record.

    ``examples[i]`` gives one unpadded example; ``examples[[i, j]]``, ``examples[a:b]`` or
    ``examples.batch(index_tensor)`` a padded batch trimmed to its longest sequence.
    """

    input_ids: torch.Tensor  # (N, T) int64, right-padded with pad_token_id
    attention_mask: torch.Tensor  # (N, T) int64, 1 for real tokens
    pad_token_id: int = 0
    ids: list[str] = field(default_factory=list)  # record ids, parallel to rows
    num_truncated: int = 0  # records cut to max_length
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.attention_mask.shape or self.input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must be equal (N, T) shapes"
            )
        self.lengths = self.attention_mask.sum(dim=1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: Any) -> dict[str, torch.Tensor]:
        if isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for {len(self)} examples")
            n = int(self.lengths[i])
            ids = self.input_ids[i, :n]
            return {
                "input_ids": ids,
                "attention_mask": self.attention_mask[i, :n],
                "labels": ids.clone(),
            }
        if isinstance(index, slice):
            index = range(len(self))[index]
        return self.batch(index)

    def batch(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask", "labels"}`` for ``indices``, trimmed to the
        longest sequence among them; ``labels`` is ``input_ids`` with ``-100`` on padding."""
        idx = torch.as_tensor(
            list(indices) if isinstance(indices, range) else indices, dtype=torch.long
        ).reshape(-1)
        if idx.numel() == 0:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
        width = int(self.lengths[idx].max())
        input_ids = self.input_ids[idx, :width]
        mask = self.attention_mask[idx, :width]
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def pad(self, batch: dict[str, torch.Tensor], length: int | None) -> dict[str, torch.Tensor]:
        """``batch`` (from :meth:`batch`) padded as :meth:`batch` pads, to ``length`` positions
        (None: trimmed to its longest sequence): :func:`pad_batch` with this pad id."""
        return pad_batch(batch, length, self.pad_token_id)

    def stats(self) -> dict[str, float]:
        """Number of examples, token counts and truncations."""
        n = len(self)
        return {
            "examples": n,
            "tokens": int(self.lengths.sum()),
            "mean_length": float(self.lengths.float().mean()) if n else 0.0,
            "max_length": int(self.lengths.max()) if n else 0,
            "truncated": self.num_truncated,
        }


PAD_FILL = {"attention_mask": 0, "labels": IGNORE_INDEX, "token_type_ids": 0}
"""What a collator pads each per-token field with (``input_ids``: the pad id): the Hugging
Face tokenizers' and collators' values (``DataCollatorForLanguageModeling``,
``DataCollatorWithPadding``)."""


class UnpaddableFields(ValueError):
    """Per-token fields :func:`pad_batch` does not know how a collator pads (``fields``)."""

    def __init__(self, fields: list[str], known: list[str]) -> None:
        self.fields = fields
        super().__init__(
            f"pad_batch does not know how to pad the per-token field(s) {', '.join(fields)} "
            f"(it pads {', '.join(known)}): pass their padding values in fill"
        )


def pad_batch(
    batch: dict[str, torch.Tensor],
    length: int | None,
    pad_id: int,
    *,
    side: Literal["right", "left"] = "right",
    fill: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The samples of a padded batch (``input_ids``, ``attention_mask`` and, per token or per
    sample, ``labels``, per token ``token_type_ids``) padded to ``length`` positions, or with
    ``length=None`` trimmed to the extent of their attended positions: the collator's padding
    (``pad_id``, mask 0, ``IGNORE_INDEX``, type 0, or ``fill[key]``) on the positions added,
    on the right or (``side="left"``, a tokenizer with ``padding_side="left"``) on the left.
    Another per-token field (``position_ids``, ...) raises: how a collator pads it is not
    known.  The engine's padding probe calls it (``PrivacyEngine(pad=...)``): a sample's loss
    must not depend on how far its batch is padded."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    mask = batch["attention_mask"]
    width = mask.shape[1]
    cols = mask.ne(0).any(0).nonzero().flatten()
    if side == "right":
        used = int(cols[-1]) + 1 if cols.numel() else 0
    else:
        used = width - int(cols[0]) if cols.numel() else 0
    if length is None:
        length = used
    if length < used:
        raise ValueError(
            f"a sample of the batch has more than {length} tokens: it cannot be padded to "
            f"{length} positions (max_length bounds every sample's tokens)"
        )
    values = {"input_ids": pad_id, **PAD_FILL, **(fill or {})}
    per_token = {k for k, v in batch.items() if v.dim() >= 2 and v.shape[1] == width}
    unknown = sorted(per_token - values.keys())
    if unknown:
        raise UnpaddableFields(unknown, sorted(values))
    out = {}
    for k, v in batch.items():
        if k not in per_token:  # per sample (a class label), left as it is
            out[k] = v
            continue
        if length <= width:
            out[k] = v[:, :length] if side == "right" else v[:, width - length :]
        else:
            extra = v.new_full((v.shape[0], length - width, *v.shape[2:]), values[k])
            out[k] = torch.cat([v, extra] if side == "right" else [extra, v], 1)
    return out


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither a pad token nor an EOS token; set one")
    return int(pad)


def tokenize(
    ds: TextDataset,
    tokenizer: Any,
    max_length: int,
    *,
    add_eos: bool = True,
    on_overflow: Literal["truncate", "error"] = "truncate",
) -> LMExamples:
    """Tokenize every record of ``ds`` into one example of at most ``max_length`` tokens.

    Truncations are counted in ``LMExamples.num_truncated`` and logged as a warning.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if on_overflow not in ("truncate", "error"):
        raise ValueError(f"on_overflow must be 'truncate' or 'error', got {on_overflow!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no EOS token")
    pad = pad_token_id(tokenizer)
    encoded: list[list[int]] = (
        tokenizer(list(ds.texts), add_special_tokens=True)["input_ids"] if len(ds) else []
    )
    seqs: list[list[int]] = []
    truncated = 0
    for rid, ids in zip(ds.ids, encoded, strict=True):
        ids = list(ids)
        if add_eos and (not ids or ids[-1] != eos):
            ids.append(eos)
        if not ids:
            raise ValueError(f"record {rid!r} produced no tokens (empty text and add_eos=False)")
        if len(ids) > max_length:
            if on_overflow == "error":
                raise SequenceTooLongError(
                    f"record {rid!r} has {len(ids)} tokens > max_length={max_length} "
                    "(raise max_length or use on_overflow='truncate')"
                )
            ids = ids[:max_length]
            truncated += 1
        seqs.append(ids)
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    if truncated:
        log.warning(
            "truncated %d of %d records to max_length=%d tokens", truncated, len(seqs), max_length
        )
    return LMExamples(
        input_ids=input_ids,
        attention_mask=mask,
        pad_token_id=pad,
        ids=list(ds.ids),
        num_truncated=truncated,
        max_length=max_length,
    )


def eval_batches(examples: LMExamples, size: int) -> list[dict[str, torch.Tensor]]:
    """``examples`` in order, in batches of at most ``size`` (for evaluation, not training)."""
    return [
        examples.batch(list(range(i, min(i + size, len(examples)))))
        for i in range(0, len(examples), size)
    ]
