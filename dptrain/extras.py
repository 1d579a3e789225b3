"""Optional dependencies: features that only some runs need are installed as extras.

=============  ==========================================  ===================================
extra          packages                                    feature
=============  ==========================================  ===================================
federated      flwr                                        ``dptrain federated``
rl             stable-baselines3, gymnasium                ``policy: {name: rl}``
plots          matplotlib                                  the plots of ``dptrain audit``
datasets       datasets, pyarrow                           ``data.path``: Arrow / Parquet
tensorboard    tensorboard                                 ``training.report_to: [tensorboard]``
all            all of the above                            ``dev`` includes it
=============  ==========================================  ===================================

A feature imports its packages through :func:`require` when it starts (never at package
import), so a missing one is a :class:`MissingExtraError` naming the extra to install, raised
before any work is done.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError

__all__ = ["EXTRAS", "MissingExtraError", "require"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "federated": ("flwr",),
    "rl": ("stable-baselines3", "gymnasium"),
    "plots": ("matplotlib",),
    "datasets": ("datasets", "pyarrow"),
    "tensorboard": ("tensorboard",),
}


class MissingExtraError(UserError, ImportError):
    """A feature needs an optional package that is not installed; the message names the extra."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming ``extra``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        packages = " and ".join(EXTRAS[extra])
        raise MissingExtraError(
            f"{feature} needs {packages}, which {'is' if len(EXTRAS[extra]) == 1 else 'are'} "
            f"not installed (import {module!r} failed: {err}). Fix: "
            f"pip install 'dptrain[{extra}]' (or 'dptrain[all]')"
        ) from None
