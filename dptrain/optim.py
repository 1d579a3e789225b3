"""The optimizer a recipe's ``training`` section names (it only ever sees released updates)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .recipe import TrainingSection


def make_optimizer(
    training: TrainingSection, params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    t = training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
