"""Batches as tensors, dicts or tuples of tensors, sliced along the sample axis."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        return batch_len(batch[0])
    raise TypeError(f"cannot find the batch dimension of a {type(batch).__name__}")


def batch_slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: batch_slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_slice(v, start, stop) for v in batch)
    raise TypeError(f"cannot slice a batch of type {type(batch).__name__}")


def batch_cat(a: Any, b: Any) -> Any:
    """The samples of ``a`` followed by those of ``b`` (same structure)."""
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: batch_cat(v, b[k]) for k, v in a.items()}
    if isinstance(a, (tuple, list)):
        return type(a)(batch_cat(x, y) for x, y in zip(a, b, strict=True))
    raise TypeError(f"cannot concatenate batches of type {type(a).__name__}")


def batch_flip(batch: Any) -> Any:
    """The samples of ``batch`` in reverse order (same structure)."""
    if isinstance(batch, Tensor):
        return batch.flip(0)
    if isinstance(batch, dict):
        return {k: batch_flip(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_flip(v) for v in batch)
    raise TypeError(f"cannot reverse a batch of type {type(batch).__name__}")
