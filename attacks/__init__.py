"""Privacy audits of dptrain runs: membership inference (loss, zlib, min-k%, LiRA, RMIA),
canary exposure, and empirical epsilon lower bounds (one-run, f-DP one-run, Clopper-Pearson);
the white-box canary audit of a privacy configuration through the real engine.

Entry points: :func:`attacks.audit.audit_run` (``dptrain audit RUN_DIR``) and
:func:`attacks.whitebox.whitebox_audit` / :func:`attacks.whitebox.audit_configuration`."""

from .bounds import (
    ceilings,
    clopper_pearson,
    epsilon_from_rates,
    fdp_audit,
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
    "ceilings",
    "clopper_pearson",
    "epsilon_from_rates",
    "exposure_exact",
    "exposure_extrapolated",
    "fdp_audit",
    "gaussian_epsilon",
    "one_run_epsilon",
    "one_run_epsilon_best",
    "one_run_p_value",
    "register_attack",
    "roc",
]
