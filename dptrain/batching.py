"""Batches as tensors, dicts or tuples of tensors, sliced along the sample axis."""

from __future__ import annotations

from typing import Any

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
