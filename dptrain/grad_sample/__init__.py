"""Vectorized per-sample gradients and norms, by layer rule (see :mod:`.rules`)."""

from .capture import GradCapture, UnsupportedLayerError
from .fallback import FuncRule
from .rules import Rule, Use, find_rule, register_rule, trainable

__all__ = [
    "FuncRule",
    "GradCapture",
    "Rule",
    "UnsupportedLayerError",
    "Use",
    "find_rule",
    "register_rule",
    "trainable",
]
