"""Federated recipes: a ``dptrain train`` recipe plus a ``federated`` section.

The shared sections keep their meaning, seen from one client: ``training`` describes a
client's *local* work per round (``steps`` or ``epochs`` per round, expected Poisson
``batch_size`` or ``sample_rate`` on its own records, optimizer), ``policy`` its clipping and
noise, and ``privacy`` its budget: ``(epsilon, delta)`` for each of its records over *all*
rounds.  ``lora`` is required: clients exchange LoRA adapters.  Clients train plain text
(``task.kind: text``; other kinds are refused by :func:`dptrain.tasks.check_recipe_task`), with
the record as the unit unless a client declares its own, and without audit canaries.  Public
records (for a policy that evaluates the model on them, e.g. ``rl``) come from
``data.public_path`` only: a share of a client's own records (``data.public_fraction``) is not
the server's to declare public.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ..recipe import LoraSection, Recipe, RecipeError, Section

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
        None,
        description="where the simulated clients keep their ledgers and keys (client-k/); "
        "required by simulate and deploy, outside every run directory: it outlives server runs",
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

    @model_validator(mode="after")
    def _record_unit(self) -> FederatedRecipe:
        if self.data.privacy_unit is not None or self.data.person_field is not None:
            raise ValueError(
                "data.privacy_unit / data.person_field: federated clients train with the "
                "record as the privacy unit unless a client declares its own (its node config "
                "key privacy-unit=FIELD: the data holder decides what it protects, not the "
                "server); client-level DP on the server is separate. Fix: delete the key here "
                "and set privacy-unit in each client's settings"
            )
        return self

    @model_validator(mode="after")
    def _public_data(self) -> FederatedRecipe:
        if self.data.public_fraction is not None:
            raise ValueError(
                "data.public_fraction: a federated recipe cannot declare a share of a client's "
                "records public (which of its records are protected is the data holder's "
                "decision, not the server's). Fix: give public records as data.public_path (a "
                "file every client reads), or delete the key"
            )
        if self.data.public_path is None:  # the check dptrain train and each client make
            from ..plan import policy_setup_refusal
            from ..policies import policy_spec

            reason = policy_setup_refusal(
                policy_spec(self.policy.name), public_records=None, kind="federated"
            )
            if reason is not None:
                raise ValueError(reason)
        return self

    @model_validator(mode="after")
    def _no_canaries(self) -> FederatedRecipe:
        if self.data.canaries is not None:
            raise ValueError(
                "data.canaries: a federated run plants no audit canaries (its simulation's "
                "validation split and partition come from a public set-up key, so canaries "
                "drawn there would have public secrets and coins, and no audit reads them). "
                "Fix: delete data.canaries; to audit with canaries, train with `dptrain train`"
            )
        return self


def client_state_root(recipe: FederatedRecipe, run_dir: str | Path) -> Path:
    """``federated.state_dir``, checked: set, and not inside the server's run directory (a
    new server run must never reset a client's ledger)."""
    f = recipe.federated
    if not f.state_dir:
        raise RecipeError(
            "federated.state_dir: not set. The simulated clients keep their privacy ledgers "
            "and keys there, across server runs, so it must be chosen, not derived from the "
            f"output directory. Fix: add e.g. state_dir: runs/{recipe.name}-clients to the "
            "federated section (or --set federated.state_dir=DIR)"
        )
    root, run = Path(f.state_dir).resolve(), Path(run_dir).resolve()
    if root == run or root.is_relative_to(run):
        raise RecipeError(
            f"federated.state_dir: {f.state_dir} is inside the run directory {run_dir}; a new "
            "server run would start the clients with fresh ledgers. Fix: choose a directory "
            "outside every run directory"
        )
    return root
