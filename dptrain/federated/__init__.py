"""Federated fine-tuning of LoRA adapters with Flower: DP clients, FedSVD / FFA-LoRA / DP-LoRA.

Privacy contract.  Each client runs sample-level DP-SGD with the dptrain engine on its own
records (:mod:`dptrain.federated.client`) under its own settings -- state directory (ledger
and key), budget, accountant, minimum noise (:mod:`dptrain.federated.holder`); the server's
recipe only asks, and a weaker request is declined with the reason.  Every local step is
charged to the client's own ledger, kept in its state directory across rounds, restarts and
server runs, so its epsilon covers all of them; a round whose steps would exceed the client's
budget is declined, with the reason sent to the server.  The server sees only what clients
release -- adapters trained under DP and public metadata (record counts, sample rates, noise,
epsilon; the record count N is public, see :mod:`dptrain.sampling`) -- and everything it does
with them (averaging, FedSVD's SVD re-factorization, evaluation) is post-processing, which
costs no privacy.  Optional client-level DP (:mod:`dptrain.federated.strategy`) adds
server-side clipping and noise over client updates with its own accountant.

Flower (``flwr``) is the federated engine: :func:`simulate` runs an in-process Flower
simulation, :mod:`dptrain.federated.deploy` the same ClientApp and ServerApp as separate
SuperLink / SuperNode processes.
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage reports: dptrain runs offline

from .lora import STRATEGIES, LoraStrategy, get_strategy, refactorize
from .recipe import FederatedRecipe

__all__ = [
    "STRATEGIES",
    "FederatedRecipe",
    "LoraStrategy",
    "get_strategy",
    "refactorize",
    "simulate",
]


def simulate(*args, **kwargs):
    """See :func:`dptrain.federated.simulation.simulate` (imports Flower on first use)."""
    from ..extras import require

    require("flwr", "federated", "federated training")
    from .simulation import simulate as _simulate

    return _simulate(*args, **kwargs)
