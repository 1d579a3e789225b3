"""Vectorized per-sample gradients and norms, by layer rule (see :mod:`.rules`)."""

from . import lora as _lora  # noqa: F401  (registers the LoRA pair rule)
from .capture import GradCapture, UnsupportedLayerError
from .fallback import FuncRule
from .outer import Outer
from .rules import FusedRule, Rule, Use, find_rule, register_rule, trainable

__all__ = [
    "FuncRule",
    "FusedRule",
    "GradCapture",
    "Outer",
    "Rule",
    "UnsupportedLayerError",
    "Use",
    "find_rule",
    "register_rule",
    "trainable",
]
