"""Poisson sampling: each of ``n`` records joins a step's batch independently with probability
``q``, the sampling the subsampled-Gaussian accountants assume (shuffling is not Poisson).
Batches vary in size and may be empty."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class PoissonSampler:
    """Draws index sets; its state (generator and draw count) is checkpointed for exact resume."""

    def __init__(self, n: int, sample_rate: float, seed: int = 0) -> None:
        if n <= 0:
            raise ValueError(
                "the dataset is empty: Poisson sampling needs at least one record (check the data path and filters)"
            )
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.n = n
        self.sample_rate = sample_rate
        self.generator = torch.Generator().manual_seed(int(seed))
        self.draws = 0

    @property
    def expected_batch_size(self) -> float:
        return self.n * self.sample_rate

    def sample(self) -> Tensor:
        """Indices of one Poisson batch (sorted, possibly empty)."""
        self.draws += 1
        mask = torch.rand(self.n, generator=self.generator) < self.sample_rate
        return mask.nonzero().flatten()

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "sample_rate": self.sample_rate,
            "draws": self.draws,
            "state": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n or state["sample_rate"] != self.sample_rate:
            raise ValueError(
                f"checkpointed sampler is for n={state['n']}, q={state['sample_rate']}, but this "
                f"run has n={self.n}, q={self.sample_rate}: resume with the same data and recipe"
            )
        self.generator.set_state(state["state"])
        self.draws = state["draws"]
