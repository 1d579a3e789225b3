"""Federated recipes: a ``dptrain train`` recipe plus a ``federated`` section.

The shared sections keep their meaning, seen from one client: ``training`` describes a
client's *local* work per round (``steps`` or ``epochs`` per round, expected Poisson
``batch_size`` or ``sample_rate`` on its own records, optimizer), ``policy`` its clipping and
noise, and ``privacy`` its budget: ``(epsilon, delta)`` for each of its records over *all*
rounds.  ``lora`` is required: clients exchange LoRA adapters.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..recipe import LoraSection, Recipe, Section

STRATEGIES = ("fedsvd", "ffa_lora", "dp_lora")


class PartitionSection(Section):
    """How the training records are split over clients (seeded by the recipe's ``seed``)."""

    by: str | None = Field(
        "kind", description="record field whose values are split non-IID; null: IID"
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; small = skewed")


class ClientDPSection(Section):
    """Client-level DP on the server: each client's update is clipped to L2 norm ``clip``, the
    sum gets ``N(0, (noise_multiplier * clip)^2)`` and is divided by the expected number of
    sampled clients; clients are Poisson-sampled at ``sample_rate`` per round."""

    clip: float = Field(gt=0)
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(1.0, gt=0, le=1)
    delta: float = Field(1e-3, gt=0, lt=1)


class FederatedSection(Section):
    clients: int = Field(3, ge=1, description="number of clients (partitions of the data)")
    rounds: int = Field(3, ge=1)
    strategy: Literal["fedsvd", "ffa_lora", "dp_lora"] = "fedsvd"
    min_clients: int = Field(1, ge=1, description="fewest updates a round aggregates")
    round_timeout: float = Field(600.0, gt=0, description="seconds a round waits for replies")
    partition: PartitionSection = Field(default_factory=PartitionSection)
    client_dp: ClientDPSection | None = None
    state_dir: str | None = Field(
        None, description="where clients keep ledgers and state; default <run dir>/clients"
    )

    @model_validator(mode="after")
    def _min_clients(self) -> FederatedSection:
        if self.min_clients > self.clients:
            raise ValueError(
                f"min_clients ({self.min_clients}) exceeds clients ({self.clients}); lower "
                "federated.min_clients"
            )
        return self


class FederatedRecipe(Recipe):
    command: ClassVar[str] = "federated"

    lora: LoraSection = Field(description="required: clients exchange LoRA adapters")
    federated: FederatedSection
