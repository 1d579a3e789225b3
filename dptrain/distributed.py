"""Data-parallel private training over ``torch.distributed`` (gloo on CPU, NCCL on GPUs: each
rank trains on ``cuda:LOCAL_RANK``).

Contract: every rank draws the same global Poisson batch (same sampler seed) and processes
only its shard of it (records ``i`` with ``i mod W == rank``), so the union over ranks is
exactly one Poisson sample of the whole dataset at rate ``q``.  Per step:

1. rank 0 plans the step and checks the budget; the plan and the decision are broadcast;
2. each rank clips its samples per group and sums them, and computes the policy's private
   counts of its samples (:meth:`dptrain.policies.Policy.private_counts`, e.g. the rl
   policy's within-clip counts); sums and counts are all-reduced (SUM), one collective per
   dtype (float64 for the counts and statistics, float32 for float32 sums), so every rank
   holds ``sum_b clip(g_b)`` and the counts over the global batch;
3. rank 0 alone runs the policy's release (adding the Gaussian noise exactly once) and
   broadcasts the update; every rank applies the same update, so parameters stay identical;
4. every rank records the same event; rank 0 alone writes the ledger and checkpoints.

The mechanism, its sensitivity and its accountant event are those of one process on the
global batch: privacy does not depend on the number of ranks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1): NCCL
    when ``training.device`` resolves to a GPU (each rank on ``cuda:LOCAL_RANK``, see
    :func:`dptrain.hardware.resolve_device`), gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    from .hardware import resolve_device

    where = resolve_device(device)
    backend = "nccl" if where.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(where)
    dist.init_process_group(backend=backend)
    return True


def shard(indices: Tensor) -> Tensor:
    """This rank's part of a global batch of record indices."""
    w = world_size()
    return indices if w == 1 else indices[indices % w == rank()]


def _wire_dtype(t: Tensor) -> torch.dtype:
    """The dtype ``t`` travels in: float64 for float64 and non-floating tensors (integers sum
    exactly below 2^53), float32 for the rest (half precision sums in float32)."""
    return torch.float64 if t.dtype == torch.float64 or not t.is_floating_point() else torch.float32


def _buffers(tensors: list[Tensor]) -> list[tuple[torch.dtype, list[int], Tensor]]:
    """One contiguous buffer per wire dtype (float64 first), with the positions it holds."""
    out = []
    for dtype in (torch.float64, torch.float32):
        where = [i for i, t in enumerate(tensors) if _wire_dtype(t) == dtype]
        if where:
            flat = torch.cat([tensors[i].reshape(-1).to(dtype) for i in where]).contiguous()
            out.append((dtype, where, flat))
    return out


def _unflat(
    buffers: list[tuple[torch.dtype, list[int], Tensor]], like: list[Tensor]
) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(like)
    for _, where, flat in buffers:
        i = 0
        for j in where:
            t = like[j]
            out[j] = flat[i : i + t.numel()].view_as(t).to(t.dtype)
            i += t.numel()
    return out  # type: ignore[return-value]


def all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Element-wise sums over ranks, one collective per wire dtype (a float32 tensor is
    summed in float32, not widened to float64 because a float64 one is in the list)."""
    if world_size() == 1 or not tensors:
        return tensors
    buffers = _buffers(tensors)
    for _, _, flat in buffers:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return _unflat(buffers, tensors)


def broadcast_tensors(tensors: list[Tensor], src: int = 0) -> list[Tensor]:
    """Rank ``src``'s tensors on every rank (shapes must agree), one collective per wire
    dtype (exact: every dtype converts to its wire dtype and back unchanged)."""
    if world_size() == 1 or not tensors:
        return tensors
    buffers = _buffers(tensors)
    for _, _, flat in buffers:
        dist.broadcast(flat, src=src)
    return _unflat(buffers, tensors)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
