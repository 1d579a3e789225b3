"""Parameter groups for per-group clipping: ``flat``, ``per_layer`` (a LoRA module is one layer)
and ``per_param``."""

from __future__ import annotations

import re

from torch import nn

GROUPINGS = ("flat", "per_layer", "per_param")
_LORA = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)(\.|$)")


def layer_of(param_name: str) -> str:
    """The layer a parameter belongs to: its module path, with LoRA A/B folded into the
    adapted layer (``...q_proj.lora_A.default.weight`` -> ``...q_proj``)."""
    m = _LORA.search(param_name)
    if m:
        return param_name[: m.start()]
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def group_parameters(model: nn.Module, grouping: str = "flat") -> dict[str, list[str]]:
    """Map group name -> names of the trainable parameters in it, in model order."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping '{grouping}': choose one of {', '.join(GROUPINGS)}")
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = {"flat": "all", "per_layer": layer_of(name), "per_param": name}[grouping]
        groups.setdefault(key, []).append(name)
    if not groups:
        raise ValueError(
            "the model has no trainable parameters: unfreeze some (or add LoRA adapters) "
            "before making it private"
        )
    return groups
