"""The Trainer's training batches: keyed Poisson samples, one per private step.

Step ``t``'s batch is ``PoissonSampler(ids, q, key).sample(t)`` (independent per-record
coins, a function of the key, ``t`` and the record ids only), never the Trainer's shuffling
sampler.  The DataLoader yields, per step, ``pieces`` items (the Trainer's gradient
accumulation micro-steps): ``pieces - 1`` markers and then the whole Poisson batch, collated
once; the engine splits it into physical chunks itself (a virtual batch, noise added once).
Every item carries its step and piece, so the trainer can check that it takes step ``t`` on
step ``t``'s coins (also after a resume, where the Trainer skips the batches already taken).

One Trainer "epoch" is ``ceil(1 / q)`` steps (``N`` records at rate ``q``: one pass in
expectation); epoch ``e`` holds steps ``e * ceil(1/q)`` onwards, up to the planned total.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ...data.loading import canonical_id
from ...sampling import PoissonSampler
from .arguments import DPTrainerError

STEP_KEY = "dp_step"  # marker keys of a collated item; removed before the model sees it
PIECE_KEY = "dp_piece"


def record_ids(dataset: Any, id_column: str = "id") -> list[str]:
    """One unique id per record: the dataset's ``ids`` (:class:`dptrain.data.LMExamples`), or
    the ``id_column`` field where every record has one (in the canonical text of
    :func:`dptrain.data.loading.canonical_id`: ``7``, ``7.0``, ``tensor(7)`` and ``"7"`` are
    ``"7"``), else ``rec-<16 hex digits of SHA-256 of the record's fields>`` with ``~k`` for
    the k-th further duplicate (as :func:`dptrain.data.loading.content_ids`), so that adding a
    record changes no other record's coins."""
    n = len(dataset)
    own = getattr(dataset, "ids", None)
    if isinstance(own, list) and len(own) == n and n and all(isinstance(i, str) for i in own):
        if len(set(own)) != n:
            raise DPTrainerError(
                "train_dataset.ids are not unique: each record needs its own coins"
            )
        return list(own)
    first = dataset[0] if n else None
    if isinstance(first, dict) and id_column in first:
        ids = []
        for i in range(n):
            row = dataset[i]
            rid = canonical_id(row.get(id_column), f"train_dataset record {i}", id_column)
            if rid is None:
                raise DPTrainerError(
                    f"PrivacyArguments.id_column: record {i} has no '{id_column}' (missing, "
                    "null or blank) while record 0 has one. Fix: give every record an id, or "
                    "none"
                )
            ids.append(rid)
        if len(set(ids)) != n:
            raise DPTrainerError(
                f"PrivacyArguments.id_column: the '{id_column}' values are not unique; each "
                "record needs its own Poisson coins. Fix: make them unique, or name another "
                "column with id_column"
            )
        return ids
    seen: dict[str, int] = {}
    out = []
    for i in range(n):
        base = "rec-" + hashlib.sha256(_canonical(dataset[i]).encode()).hexdigest()[:16]
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.append(base if k == 0 else f"{base}~{k}")
    return out


def _canonical(record: Any) -> str:
    def plain(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.tolist()
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items())}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if hasattr(x, "tolist"):  # numpy
            return x.tolist()
        return x

    return json.dumps(plain(record), sort_keys=True, default=str)


@dataclass(frozen=True)
class StepBatch:
    """What the batch sampler yields: step ``step``'s piece ``piece`` of ``pieces``, with the
    Poisson batch's record indices in the last piece."""

    step: int
    piece: int
    pieces: int
    indices: tuple[int, ...]


class PoissonBatches:
    """Batch sampler of the planned steps' Poisson batches (see the module docstring)."""

    def __init__(self, sampler: PoissonSampler, steps: int, pieces: int = 1) -> None:
        self.sampler = sampler
        self.steps = steps
        self.pieces = pieces
        self.steps_per_epoch = min(steps, max(1, math.ceil(1.0 / sampler.sample_rate)))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.pieces

    def __iter__(self) -> Iterator[list[StepBatch]]:
        first = self.epoch * self.steps_per_epoch
        for t in range(first, min(first + self.steps_per_epoch, self.steps)):
            idx = tuple(int(i) for i in self.sampler.sample(t))
            for piece in range(self.pieces):
                last = piece == self.pieces - 1
                yield [StepBatch(t, piece, self.pieces, idx if last else ())]


class StepRecords(Dataset):
    """``dataset`` read through :class:`StepBatch` keys: the records of one piece."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: StepBatch) -> tuple[StepBatch, list[Any]]:
        return key, [self.dataset[i] for i in key.indices]


class StepCollator:
    """Collates a piece's records with the Trainer's collator and marks its step and piece;
    a piece without records (a marker, or an empty Poisson batch) has only the marks."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: Sequence[tuple[StepBatch, list[Any]]]) -> dict[str, Any]:
        (key, records), *rest = items
        if rest:
            raise DPTrainerError("a Poisson piece must arrive alone (batch sampler misuse)")
        batch: dict[str, Any] = {}
        if records:
            collated = self.collate(records)
            if not isinstance(collated, dict) and not hasattr(collated, "keys"):
                raise DPTrainerError(
                    "data_collator: DPTrainer needs collated batches as dicts of tensors (one "
                    f"row per record); got {type(collated).__name__}. Fix: return a dict"
                )
            batch.update(dict(collated))
        batch[STEP_KEY] = key.step
        batch[PIECE_KEY] = key.piece
        return batch


class PadCollator:
    """Right-pads a list of LM records (``input_ids``, ``attention_mask``, ``labels``, ... of
    varying lengths) into a batch: ``input_ids`` with the pad id, ``labels`` with -100, other
    sequences with 0; scalars are stacked.  The rows of :class:`dptrain.data.LMExamples`."""

    def __init__(self, tokenizer: Any = None, pad_token_id: int | None = None) -> None:
        if pad_token_id is None:
            from ...data.lm import pad_token_id as tokenizer_pad

            pad_token_id = tokenizer_pad(tokenizer) if tokenizer is not None else 0
        self.pad = {"input_ids": int(pad_token_id), "labels": -100}

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {}
        for k in rows[0]:
            values = [torch.as_tensor(r[k]) for r in rows]
            if values[0].dim() == 0:
                out[k] = torch.stack(values)
                continue
            width = max(v.shape[0] for v in values)
            batch = torch.full(
                (len(values), width),
                self.pad.get(k, 0),
                dtype=values[0].dtype,
                device=values[0].device,
            )
            for i, v in enumerate(values):
                batch[i, : v.shape[0]] = v
            out[k] = batch
        return out


class BatchPadder:
    """The padding probe's ``pad(batch, n)`` for a DPTrainer batch (``PrivacyEngine(pad=...)``):
    the collated dict padded as a Hugging Face collator pads it -- ``input_ids`` with the
    tokenizer's pad id, ``attention_mask`` 0, per-token ``labels`` -100, ``token_type_ids`` 0
    (:func:`dptrain.data.lm.pad_batch`), on the tokenizer's ``padding_side``.

    It refuses, rather than guess, a batch it cannot pad as the collator does: one without an
    ``attention_mask`` (the added positions could not be masked out), one with another
    per-token field (``position_ids``: a collator numbers padded positions its own way), and
    one padded on the other side than ``padding_side``.  The probe runs on the first step's
    batch, before anything is released or charged."""

    def __init__(self, pad_token_id: int, side: str = "right") -> None:
        if side not in ("right", "left"):
            raise DPTrainerError(f"padding_side: expected 'right' or 'left', got {side!r}")
        self.pad_token_id = int(pad_token_id)
        self.side = side

    def __call__(self, batch: dict[str, Any], length: int | None) -> dict[str, Any]:
        from ...data.lm import UnpaddableFields, pad_batch

        mask = batch.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise DPTrainerError(
                "PrivacyArguments.max_length: the padding probe pads the first batch up to "
                "max_length with masked positions, but the batch has no (B, T) attention_mask. "
                "Fix: let the data collator return attention_mask, or pass DPTrainer(pad=f) "
                "with f(batch, n) padding the batch to n positions as your collator does"
            )
        real = mask.ne(0)
        has = real.any(1)
        first, last = real[:, 0], real[:, -1]
        other = (~first & last & has) if self.side == "right" else (first & ~last & has)
        if bool(other.any()):
            seen = "left" if self.side == "right" else "right"
            raise DPTrainerError(
                f"the data collator pads on the {seen}, but the tokenizer's padding_side is "
                f"'{self.side}': the padding probe would pad the batch on the wrong side. Fix: "
                f"set tokenizer.padding_side = '{seen}' (or make the collator pad on the "
                f"{self.side}), or pass DPTrainer(pad=f) padding as your collator does"
            )
        try:
            return pad_batch(batch, length, self.pad_token_id, side=self.side)  # type: ignore[arg-type]
        except UnpaddableFields as err:
            raise DPTrainerError(
                f"PrivacyArguments.max_length: the padding probe cannot pad the per-token "
                f"field(s) {', '.join(err.fields)} of the batch as your collator would (it pads "
                "input_ids, attention_mask, labels and token_type_ids; position_ids, say, "
                "depend on how the collator numbers padded positions), and will not guess. "
                "Fix: drop them from the collated batch (the model numbers positions itself), "
                "or pass DPTrainer(pad=f) with f(batch, n) padding the batch to n positions as "
                "your collator does"
            ) from None


def check_length(batch: dict[str, Any], max_length: int, step: int) -> None:
    """Refuse a batch wider than ``max_length`` positions (``PrivacyArguments.max_length``, a
    public bound on every record's tokens), naming the fix: a record longer than the bound, or
    a collator that pads beyond it."""
    mask = batch.get("attention_mask")
    ref = mask if isinstance(mask, torch.Tensor) else batch.get("input_ids")
    if not isinstance(ref, torch.Tensor) or ref.dim() < 2 or ref.shape[1] <= max_length:
        return
    width = ref.shape[1]
    longest = int(mask.ne(0).sum(1).max()) if isinstance(mask, torch.Tensor) else width
    fix = (
        "Fix: truncate every record when tokenizing (tokenizer(..., truncation=True, "
        f"max_length={max_length})) and let the collator pad to the batch's longest record, "
        "or raise PrivacyArguments.max_length (a public bound: never set it from the data)"
    )
    if longest > max_length:
        raise DPTrainerError(
            f"PrivacyArguments.max_length = {max_length}: a record of step {step}'s batch has "
            f"{longest} tokens. max_length bounds every record's tokens, and DPTrainer does not "
            f"truncate (nothing was released or charged for this step). {fix}"
        )
    raise DPTrainerError(
        f"PrivacyArguments.max_length = {max_length}: the data collator padded step {step}'s "
        f"batch to {width} positions (its records fit in {max_length}). Fix: pad to the "
        "longest record (padding=True, not padding='max_length' beyond the bound), or raise "
        "PrivacyArguments.max_length to the collator's padded length"
    )
