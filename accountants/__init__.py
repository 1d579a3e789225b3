"""Privacy accounting for dptrain: the ledger, RDP / PRV / PLD accountants, the budget filter,
and noise calibration.

All accountants report upper bounds on epsilon (never estimates) for add/remove-one
neighbouring datasets and Poisson-subsampled Gaussian steps (see :class:`Event`); the RDP
accountant also accounts error-feedback (DiceSGD) steps (:mod:`accountants.error_feedback`).
"""

from .base import (
    Accountant,
    DeltaBelowFloorError,
    UnsupportedEventError,
    available_accountants,
    get_accountant,
    register_accountant,
)
from .budget import UNLIMITED, Budget, BudgetExceeded, BudgetFilter
from .calibrate import EpsilonUnreachableError, calibrate_noise, calibrate_steps
from .error_feedback import ERROR_FEEDBACK, error_feedback_event
from .ledger import POISSON_GAUSSIAN, Event, Ledger, LedgerError, LedgerNotFoundError
from .rdp import ADAPTIVE_ORDERS, RDP_ORDERS, RdpAccountant

# The PLD and PRV accountants import on first use (PEP 562): prv-accountant and dp-accounting's
# PLD code are slow to import, and `dptrain epsilon --accountant rdp` needs neither.
_LAZY = {"PldAccountant": ".pld", "PrvAccountant": ".prv", "PrvFallbackWarning": ".prv"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'accountants' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ADAPTIVE_ORDERS",
    "ERROR_FEEDBACK",
    "POISSON_GAUSSIAN",
    "RDP_ORDERS",
    "UNLIMITED",
    "Accountant",
    "Budget",
    "BudgetExceeded",
    "BudgetFilter",
    "DeltaBelowFloorError",
    "EpsilonUnreachableError",
    "Event",
    "Ledger",
    "LedgerError",
    "LedgerNotFoundError",
    "PldAccountant",
    "PrvAccountant",
    "PrvFallbackWarning",
    "RdpAccountant",
    "UnsupportedEventError",
    "available_accountants",
    "calibrate_noise",
    "calibrate_steps",
    "error_feedback_event",
    "get_accountant",
    "register_accountant",
]
