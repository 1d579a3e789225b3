"""Exact per-sample gradients and norms for every use of every trainable parameter.

:mod:`.capture` records uses (module hooks plus a torch-function mode inside hooked calls),
:mod:`.plan` decides how each use is differentiated from two probe passes, :mod:`.ops` holds the
rules of the torch functions that take parameters, :mod:`.local` re-runs module calls per
sample, and :mod:`.outer` is the algebra of factorized gradients (ghost norms).
"""

from .capture import GradCapture, PlanMiss, Recorded, register_scope
from .local import LocalRule
from .ops import OPS, OpCall, OpRule, UnsupportedLayerError, Use, register_op
from .outer import Outer

__all__ = [
    "OPS",
    "GradCapture",
    "LocalRule",
    "OpCall",
    "OpRule",
    "Outer",
    "PlanMiss",
    "Recorded",
    "UnsupportedLayerError",
    "Use",
    "register_op",
    "register_scope",
]
