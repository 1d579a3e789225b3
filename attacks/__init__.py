"""Privacy audits of dptrain runs: membership inference (loss, zlib, min-k%, LiRA, RMIA),
canary exposure, and empirical epsilon lower bounds (one-run, Clopper-Pearson).

Entry point: :func:`attacks.audit.audit_run` (``dptrain audit RUN_DIR``)."""

from .bounds import (
    clopper_pearson,
    epsilon_from_rates,
    gaussian_epsilon,
    one_run_epsilon,
    one_run_epsilon_best,
    one_run_p_value,
)
from .exposure import exposure_exact, exposure_extrapolated
from .metrics import Roc, roc
from .mia import ATTACKS, Observations, register_attack

__all__ = [
    "ATTACKS",
    "Observations",
    "Roc",
    "clopper_pearson",
    "epsilon_from_rates",
    "exposure_exact",
    "exposure_extrapolated",
    "gaussian_epsilon",
    "one_run_epsilon",
    "one_run_epsilon_best",
    "one_run_p_value",
    "register_attack",
    "roc",
]
