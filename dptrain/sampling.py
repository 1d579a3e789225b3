"""Poisson sampling by per-record keyed coins: each record joins step ``t``'s batch
independently with probability ``q``, the sampling the subsampled-Gaussian accountants assume
(shuffling is not Poisson).  Batches vary in size and may be empty.

Coins that do not shift.  Record ``r``'s coin at step ``t`` is the first word of
``AES_k(t * 2^64 + id64(r))`` (``k``: the run key's "coins" sub-key, ``id64``: 64 bits of
SHA-256 of the record's id), and ``r`` is in the batch iff that word is below
``floor(q 2^64)``: probability ``floor(q 2^64) / 2^64 <= q`` (smaller ``q`` is never less
private).  Step ``t``'s batch is therefore a pure function of (key, ``t``, the ids): adding or
removing a record changes that record's coins only, a duplicate record (own id) gets its own
coins, and resuming needs only the step number.

What is public.  Neighbouring datasets differ by adding or removing one record; the number of
records ``N`` is treated as public (it is visible in ``q = B / N``, in the default delta
``1 / (10 N)`` and in ``run.json``), so the guarantee is about a record beyond that count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .secret import RunKey, below, record_keys


class PoissonSampler:
    """Index sets of Poisson batches over records identified by ``ids`` (unique strings), with
    coins from ``key`` (default: a fresh secret key; pass the run's key to resume a run)."""

    def __init__(self, ids: Sequence[str], sample_rate: float, key: RunKey | None = None) -> None:
        if isinstance(ids, int):
            raise TypeError(
                "PoissonSampler takes the records' ids (unique strings, e.g. LMExamples.ids), "
                "not a count: coins keyed by position would shift when a record is added. "
                "For records without ids, [str(i) for i in range(n)] is right only if no record "
                "is ever inserted before another"
            )
        n = len(ids)
        if n <= 0:
            raise ValueError(
                "the dataset is empty: Poisson sampling needs at least one record (check the data path and filters)"
            )
        if len(set(ids)) != n:
            raise ValueError("record ids must be unique: each record needs its own coins")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.n = n
        self.sample_rate = sample_rate
        self.keys = record_keys(list(ids))
        self._prf = (key if key is not None else RunKey.generate()).prf("coins")

    @property
    def expected_batch_size(self) -> float:
        return self.n * self.sample_rate

    def mask(self, step: int) -> np.ndarray:
        """Step ``step``'s inclusion decisions, one per record."""
        return below(self._prf.at(step, self.keys)[:, 0], self.sample_rate)

    def sample(self, step: int) -> Tensor:
        """Indices of step ``step``'s Poisson batch (sorted, possibly empty)."""
        return torch.from_numpy(np.flatnonzero(self.mask(step)))

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sample_rate": self.sample_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n or state["sample_rate"] != self.sample_rate:
            raise InputError(
                f"checkpointed sampler is for n={state['n']}, q={state['sample_rate']}, but this "
                f"run has n={self.n}, q={self.sample_rate}: resume with the same data and recipe"
            )
